//! Turning a batch's row groups into what the flush transaction loads: COPY groups become
//! [`Unit`]s as they are; rows kept as JSON (their table's columns were unknown at ingest)
//! are encoded for the table's columns as they are now, row by row; rows pgspool refused
//! at ingest (`?invalid=dead_letter`) become dead letters as they are.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::Client;

use super::batch::BatchGroup;
use super::load::{DeadLetter, Refusal, Unit};
use crate::lsn::Lsn;
use crate::rowgroup::{self, RowFormat, RowGroup};
use crate::rows::{self, BodyFormat, RowError};
use crate::schema::{self, Found, SchemaCache, TableSchema};

/// The batch's rows as units to load, the rows refused before PostgreSQL sees them, and
/// the tables of rows kept as JSON that cannot take them yet.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The rows to load.
    pub units: Vec<Unit>,
    /// Rows kept as JSON that pgspool's encoder refuses for the table's columns.
    pub refused: Vec<DeadLetter>,
    /// Tables (by the name their rows give) that cannot take their rows kept as JSON, and
    /// why.
    pub held: Vec<(String, Refusal)>,
}

/// Turns the batch's groups into units. Rows kept as JSON (their table's columns were
/// unknown at ingest) are encoded for the table's columns as they are now, row by row: a
/// row the encoder refuses is a dead letter; a missing table or an unknown column holds
/// the table, as PostgreSQL's own error would. The columns read are put in `schemas`, if
/// given, for ingest to validate later rows with. `pgspool dead-letters retry` prepares
/// dead letters this way too.
///
/// # Errors
/// When reading a table's columns fails.
pub async fn prepare(
    client: &Client,
    groups: Vec<BatchGroup>,
    schemas: Option<&SchemaCache>,
) -> Result<Prepared, tokio_postgres::Error> {
    let mut prepared = Prepared::default();
    for group in groups {
        let key = group.table.to_string();
        match group.format {
            RowFormat::Copy => prepared.units.push(Unit {
                key,
                table: group.table,
                columns: group.columns,
                data: Bytes::from(group.data),
                runs: group.runs,
                sent_as: HashMap::new(),
            }),
            RowFormat::Json if prepared.held.iter().any(|(k, _)| *k == key) => {}
            RowFormat::Json => {
                let schema = match schema::fetch(client, &group.table).await? {
                    Found::Table(schema) => match schemas {
                        Some(schemas) => schemas.put(&group.table, schema).await,
                        None => Arc::new(schema),
                    },
                    Found::Own => {
                        prepared.hold(key, "42501", "it is one of pgspool's own tables");
                        continue;
                    }
                    Found::NotATable(kind) => {
                        prepared.hold(key, "42809", &format!("it is {kind}, not a table"));
                        continue;
                    }
                    Found::Missing => {
                        prepared.hold(key, "42P01", "the table does not exist");
                        continue;
                    }
                };
                if let Err(unknown) = prepared.encode_json(&key, &group, &schema) {
                    prepared.hold(key, "42703", &unknown.to_string());
                }
            }
            // Rows pgspool refused at ingest (`?invalid=dead_letter`): dead letters as they
            // are, with pgspool's reason and no SQLSTATE.
            RowFormat::Refused => prepared.refuse_all(&key, &group),
        }
    }
    Ok(prepared)
}

impl Prepared {
    /// Holds the table `key` for `what`, dropping what was prepared of its rows.
    fn hold(&mut self, key: String, sqlstate: &str, what: &str) {
        self.units.retain(|u| u.key != key);
        self.refused.retain(|d| d.table != key);
        let refusal = Refusal {
            sqlstate: Some(sqlstate.to_string()),
            message: format!("rows kept as JSON for {key} cannot be loaded: {what}"),
            detail: None,
            context: None,
        };
        self.held.push((key, refusal));
    }

    /// Makes every row of a refused-row group a dead letter. Records are checksummed, so
    /// a body that does not follow the format is a bug; its rows are dead letters saying
    /// so rather than lost.
    fn refuse_all(&mut self, key: &str, group: &BatchGroup) {
        let mut rows = rowgroup::refused_rows(&group.data);
        let lsns = group
            .runs
            .iter()
            .flat_map(|&(first, rows)| (0..rows).map(move |i| Lsn(first.0 + i)));
        for lsn in lsns {
            let (row, message) = match rows.next() {
                Some(Ok((text, reason))) => (text.to_string(), reason.to_string()),
                Some(Err(e)) => (String::new(), format!("refused at ingest; then {e}")),
                None => (
                    String::new(),
                    "refused at ingest; its text is missing".into(),
                ),
            };
            self.refused.push(DeadLetter {
                lsn,
                table: key.to_string(),
                row,
                columns: None,
                copy_line: None,
                refusal: Refusal::by_pgspool(message),
            });
        }
    }

    /// Encodes a JSON group's rows one by one into units, refusing the rows the encoder
    /// refuses. Records are checksummed, so a body that does not hold a row for each of
    /// its LSNs is a bug; those LSNs are dead letters saying so rather than lost.
    ///
    /// # Errors
    /// The first row naming a column the table does not have.
    fn encode_json(
        &mut self,
        key: &str,
        group: &BatchGroup,
        schema: &TableSchema,
    ) -> Result<(), RowError> {
        let lsns = group
            .runs
            .iter()
            .flat_map(|&(first, rows)| (0..rows).map(move |i| Lsn(first.0 + i)));
        let mut built: Vec<(Unit, Vec<u8>)> = Vec::new();
        let mut texts = rowgroup::json_rows(&group.data);
        for lsn in lsns {
            let text = match texts.next() {
                Some(Ok(text)) => text,
                broken => {
                    let message = match broken {
                        Some(Err(e)) => format!("kept as JSON at ingest; then {e}"),
                        _ => "kept as JSON at ingest; its text is missing".into(),
                    };
                    self.refused.push(DeadLetter {
                        lsn,
                        table: key.to_string(),
                        row: String::new(),
                        columns: None,
                        copy_line: None,
                        refusal: Refusal::by_pgspool(message),
                    });
                    continue;
                }
            };
            let encoded = rows::parse(text, BodyFormat::Json)
                .map_err(|e| e.to_string())
                .and_then(|parsed| match rows::encode(schema, &parsed) {
                    Err(unknown @ RowError::UnknownColumn { .. }) => Ok(Err(unknown)),
                    other => other.map(Ok).map_err(|e| e.to_string()),
                });
            let groups = match encoded {
                Ok(Ok(groups)) => groups,
                Ok(Err(unknown)) => return Err(unknown),
                Err(message) => {
                    self.refused.push(DeadLetter {
                        lsn,
                        table: key.to_string(),
                        row: text.to_string(),
                        columns: None,
                        copy_line: None,
                        refusal: Refusal::by_pgspool(message),
                    });
                    continue;
                }
            };
            for (_, payload) in groups {
                let row = RowGroup::decode(&payload).expect("the encoder writes row groups");
                let columns: Vec<String> = row.columns.iter().map(|c| (*c).to_string()).collect();
                let slot = match built.iter().position(|(unit, _)| unit.columns == columns) {
                    Some(slot) => slot,
                    None => {
                        let unit = Unit {
                            key: key.to_string(),
                            table: schema.table().clone(),
                            columns,
                            data: Bytes::new(),
                            runs: Vec::new(),
                            sent_as: HashMap::new(),
                        };
                        built.push((unit, Vec::new()));
                        built.len() - 1
                    }
                };
                let (unit, data) = &mut built[slot];
                data.extend_from_slice(row.body);
                match unit.runs.last_mut() {
                    Some((first, rows)) if first.0 + *rows == lsn.0 => *rows += 1,
                    _ => unit.runs.push((lsn, 1)),
                }
                unit.sent_as.insert(lsn, text.to_string());
            }
        }
        self.units.extend(built.into_iter().map(|(mut unit, data)| {
            unit.data = Bytes::from(data);
            unit
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::ColumnKind;
    use crate::schema::Column;
    use crate::table::TableName;

    /// A JSON group whose body ends after its first row, though it has three LSNs: the
    /// first row is loaded, the two others are dead letters that say what is wrong.
    #[test]
    fn json_rows_missing_from_a_body_are_dead_letters_not_lost() {
        let table = TableName {
            schema: Some("public".into()),
            name: "t".into(),
        };
        let schema = TableSchema::new(
            table.clone(),
            vec![Column {
                name: "id".into(),
                kind: ColumnKind::Scalar,
                generated: false,
            }],
        );
        let row = "{\"id\":1}";
        let mut data = u32::try_from(row.len())
            .expect("short")
            .to_le_bytes()
            .to_vec();
        data.extend_from_slice(row.as_bytes());
        data.extend_from_slice(&100u32.to_le_bytes()); // a length past the end
        let group = BatchGroup {
            format: RowFormat::Json,
            table,
            columns: Vec::new(),
            data,
            runs: vec![(Lsn(7), 3)],
        };
        let mut prepared = Prepared::default();
        prepared
            .encode_json("public.t", &group, &schema)
            .expect("encoded");
        let loaded: u64 = prepared
            .units
            .iter()
            .flat_map(|u| u.runs.iter().map(|&(_, rows)| rows))
            .sum();
        assert_eq!(loaded, 1);
        let refused: Vec<(u64, String)> = prepared
            .refused
            .iter()
            .map(|d| (d.lsn.0, d.refusal.to_string()))
            .collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert_eq!(refused[0].0, 8);
        assert!(
            refused[0].1.contains("kept as JSON at ingest; then"),
            "{refused:?}"
        );
        assert_eq!(refused[1].0, 9);
        assert!(refused[1].1.contains("its text is missing"), "{refused:?}");
    }
}
