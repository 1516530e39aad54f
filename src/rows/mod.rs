//! Rows as clients send them: parsing request bodies, and encoding rows into row groups.
//!
//! A body is one JSON object, a JSON array of objects, or NDJSON (one object per line,
//! blank lines ignored). Each row is parsed once, keeping every value's raw JSON text;
//! [`encode`] then writes the rows as COPY text for the table's columns, grouped by column
//! set, or [`encode_unchecked`] keeps them as JSON when the table's columns are not known.
//!
//! A request is all or nothing by default: the first bad row fails the whole request, and
//! the error says which row. With [`Invalid::DeadLetter`] ([`parse_each`] then
//! [`encode_parsed`]) a row pgspool refuses is set aside instead, kept as a refused row
//! (its text as sent and the reason, see [`crate::rowgroup`]) for `pgspool.dead_letters`,
//! and the other rows of the request are encoded as usual. Both ways run through one
//! encoder: it hands each refused row to a policy that either ends the encoding with that
//! error or sets the row aside.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

mod scan;

use scan::Fields;

use crate::copy::{self, ValueError};
use crate::rowgroup::{RowGroupBuilder, TARGET_GROUP_BYTES};
use crate::schema::TableSchema;
use crate::table::TableName;

/// How a request body is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per line.
    Ndjson,
}

/// Where a row sits in its request, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowPosition {
    /// The body's only object.
    Single,
    /// Index in a JSON array, from 0.
    Index(usize),
    /// Line of an NDJSON body, from 1.
    Line(usize),
}

impl fmt::Display for RowPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowPosition::Single => f.write_str("the row"),
            RowPosition::Index(i) => write!(f, "row at index {i}"),
            RowPosition::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// One row: its fields in the order given, and its raw JSON text.
#[derive(Debug)]
pub struct Row<'a> {
    /// Where the row is in its request.
    pub position: RowPosition,
    /// The object's raw text.
    pub raw: &'a str,
    /// Column name and raw JSON text of its value (checked JSON), in the order the client
    /// gave them.
    pub fields: Fields<'a>,
    /// Rows of one body with the same keys in the same order have the same shape, so the
    /// encoder resolves a shape's columns once ([`parse_each`] compares each row with the
    /// row before it).
    shape: u32,
}

/// Why a body was refused as a whole or at a row: HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON (with serde_json's line and column).
    #[error("{position}: malformed JSON: {message}")]
    Malformed {
        /// The row, or the whole body.
        position: RowPosition,
        /// What the parser says.
        message: String,
    },
    /// A row that is not a JSON object.
    #[error("{position}: a row must be a JSON object, found {found}")]
    NotAnObject {
        /// The row.
        position: RowPosition,
        /// What was found instead.
        found: &'static str,
    },
    /// The same key twice in one object.
    #[error("{position}: key {key:?} is given twice")]
    DuplicateKey {
        /// The row.
        position: RowPosition,
        /// The key.
        key: String,
    },
    /// The body holds no rows at all.
    #[error("the body holds no rows")]
    Empty,
}

/// A row that could not be parsed: its text as the client sent it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unparsed<'a> {
    /// The row's text (trimmed of surrounding whitespace); not necessarily JSON.
    pub raw: &'a str,
    /// What is wrong with it.
    pub error: BodyError,
}

/// One row of a body: parsed, or not.
pub type Parsed<'a> = Result<Row<'a>, Unparsed<'a>>;

/// Parses a body (already known to be UTF-8) into rows.
///
/// # Errors
/// The first [`BodyError`] met.
pub fn parse(body: &str, format: BodyFormat) -> Result<Vec<Row<'_>>, BodyError> {
    parse_each(body, format)?
        .into_iter()
        .map(|row| row.map_err(|unparsed| unparsed.error))
        .collect()
}

/// Parses a body (already known to be UTF-8) into rows, each parsed or not: an NDJSON line
/// that is not JSON, or any row that is not an object or gives a key twice, is an
/// [`Unparsed`] row among the others.
///
/// # Errors
/// What is wrong with the body as a whole: an array or a single object that is not JSON
/// (it cannot be split into rows), or no rows at all.
pub fn parse_each(body: &str, format: BodyFormat) -> Result<Vec<Parsed<'_>>, BodyError> {
    let mut shapes = Shapes::default();
    let rows = match format {
        BodyFormat::Ndjson => body
            .split('\n')
            .enumerate()
            .filter(|(_, line)| !line.trim_ascii().is_empty())
            .map(|(i, line)| parse_row(line, RowPosition::Line(i + 1), &mut shapes))
            .collect(),
        BodyFormat::Json => {
            let trimmed = body.trim_start();
            if trimmed.starts_with('[') {
                let elements: Vec<&RawValue> =
                    serde_json::from_str(body).map_err(|e| BodyError::Malformed {
                        position: RowPosition::Single,
                        message: e.to_string(),
                    })?;
                elements
                    .into_iter()
                    .enumerate()
                    .map(|(i, raw)| parse_row(raw.get(), RowPosition::Index(i), &mut shapes))
                    .collect()
            } else {
                match parse_row(body, RowPosition::Single, &mut shapes) {
                    Err(Unparsed {
                        error: malformed @ BodyError::Malformed { .. },
                        ..
                    }) => return Err(malformed),
                    row => vec![row],
                }
            }
        }
    };
    if rows.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(rows)
}

/// Parses one JSON object, keeping each value's raw text and refusing duplicate keys.
fn parse_row<'a>(text: &'a str, position: RowPosition, shapes: &mut Shapes<'a>) -> Parsed<'a> {
    let mut fields = Vec::with_capacity(shapes.keys.len());
    if let Some(as_template) = scan::scan_flat(text, &shapes.keys, &mut fields) {
        return Ok(Row {
            position,
            raw: text.trim_ascii(),
            shape: shapes.shape_of(&fields, as_template),
            fields,
        });
    }
    parse_row_slow(text, position, shapes)
}

/// [`parse_row`] through serde_json: every row the fast path leaves, and every error.
fn parse_row_slow<'a>(text: &'a str, position: RowPosition, shapes: &mut Shapes<'a>) -> Parsed<'a> {
    let unparsed = |error| Unparsed {
        raw: text.trim_ascii(),
        error,
    };
    let malformed = |e: serde_json::Error| {
        unparsed(BodyError::Malformed {
            position,
            message: e.to_string(),
        })
    };
    let found = match text.trim_ascii_start().as_bytes().first() {
        Some(b'{') => None,
        Some(b'[') => Some("an array"),
        Some(b'"') => Some("a string"),
        Some(b't' | b'f') => Some("a boolean"),
        Some(b'n') => Some("null"),
        _ => Some("a number"),
    };
    if let Some(found) = found {
        // Malformed JSON is reported as such before its shape.
        serde_json::from_str::<IgnoredAny>(text).map_err(malformed)?;
        return Err(unparsed(BodyError::NotAnObject { position, found }));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de
        .deserialize_map(RowVisitor {
            template: &shapes.keys,
        })
        .and_then(|fields| de.end().map(|()| fields))
        .map_err(malformed)?;
    match fields {
        Ok((fields, as_template)) => Ok(Row {
            position,
            raw: text.trim_ascii(),
            shape: shapes.shape_of(&fields, as_template),
            fields,
        }),
        Err(key) => Err(unparsed(BodyError::DuplicateKey { position, key })),
    }
}

/// The shape of the rows parsed last: their keys, in order (all distinct).
#[derive(Default)]
struct Shapes<'a> {
    keys: Vec<&'a str>,
    shape: u32,
}

impl<'a> Shapes<'a> {
    /// The shape of a row whose keys (all distinct) are `fields`; `as_template` says they
    /// are exactly [`Shapes::keys`].
    fn shape_of(&mut self, fields: &[(Cow<'a, str>, &'a str)], as_template: bool) -> u32 {
        if as_template {
            return self.shape;
        }
        self.shape += 1;
        let row_shape = self.shape;
        self.keys.clear();
        for (key, _) in fields {
            match key {
                Cow::Borrowed(key) => self.keys.push(key),
                Cow::Owned(_) => {
                    // A key with escapes cannot be kept: the next rows get a new shape
                    // (an empty template under a shape no row has had).
                    self.keys.clear();
                    self.shape += 1;
                    break;
                }
            }
        }
        row_shape
    }
}

/// Collects an object's fields (and whether its keys are exactly `template`'s), or the
/// first key given twice.
struct RowVisitor<'t, 'de> {
    /// The keys of the row before, all distinct.
    template: &'t [&'de str],
}

impl<'de> Visitor<'de> for RowVisitor<'_, 'de> {
    type Value = Result<(Fields<'de>, bool), String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Fields<'de> =
            Vec::with_capacity(self.template.len().max(map.size_hint().unwrap_or(16)));
        let mut duplicate = None;
        // Whether the keys so far are the template's first keys (so distinct): the common
        // case of a body whose rows all name the same columns costs one comparison a key.
        let mut as_template = true;
        // Keys seen, once there are too many to compare one by one.
        let mut seen: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let repeated =
                if as_template && self.template.get(fields.len()).is_some_and(|t| *t == key) {
                    false
                } else if fields.len() < 32 {
                    as_template = false;
                    fields.iter().any(|(k, _)| *k == key)
                } else {
                    as_template = false;
                    let seen =
                        seen.get_or_insert_with(|| fields.iter().map(|(k, _)| k.clone()).collect());
                    !seen.insert(key.clone())
                };
            if duplicate.is_some() || repeated {
                duplicate.get_or_insert_with(|| key.into_owned());
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, value.get()));
        }
        let as_template = as_template && fields.len() == self.template.len();
        Ok(duplicate.map_or(Ok((fields, as_template)), Err))
    }
}

/// Deserializes a key without copying it unless it holds escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

/// Why a row cannot be stored in its table: HTTP 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// A key that is not a column of the table.
    #[error("{position}: column {column:?} does not exist in table {table}")]
    UnknownColumn {
        /// The row.
        position: RowPosition,
        /// The key.
        column: String,
        /// The table.
        table: TableName,
    },
    /// A value for a generated column.
    #[error(
        "{position}: column {column:?} is GENERATED ALWAYS; PostgreSQL computes its values, \
         leave it out"
    )]
    GeneratedColumn {
        /// The row.
        position: RowPosition,
        /// The column.
        column: String,
    },
    /// A value that cannot be stored.
    #[error("{position}: column {column:?}: {error}")]
    Value {
        /// The row.
        position: RowPosition,
        /// The column (or key).
        column: String,
        /// What is wrong.
        error: ValueError,
    },
}

/// Row groups built from one request: `(rows, payload)` pairs, each payload a
/// [`crate::rowgroup`] of at most about [`TARGET_GROUP_BYTES`].
pub type Groups = Vec<(u32, Vec<u8>)>;

/// What a request does with rows pgspool cannot store (`?invalid=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Invalid {
    /// The first such row refuses the whole request (the default).
    #[default]
    Reject,
    /// Such rows are kept as refused rows, for `pgspool.dead_letters`; the others are
    /// encoded as usual.
    DeadLetter,
}

/// Why one row of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowRefusal {
    /// It could not be parsed.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// It cannot be stored in its table.
    #[error(transparent)]
    Row(#[from] RowError),
}

/// One request's rows, encoded.
#[derive(Debug, Default)]
pub struct Encoded {
    /// The row groups: the rows kept, then (with [`Invalid::DeadLetter`]) the refused rows.
    pub groups: Groups,
    /// The rows refused, by index in the request (from 0), in order.
    pub refused: Vec<(usize, RowRefusal)>,
}

/// Encodes `rows` as COPY text for `schema`'s table, one group per distinct column set.
/// Columns are written in table order, so rows naming the same columns in another order
/// share a group.
///
/// # Errors
/// The first row that names an unknown or generated column or holds a value that cannot be
/// stored.
pub fn encode(schema: &TableSchema, rows: &[Row<'_>]) -> Result<Groups, RowError> {
    encode_with(schema, rows.iter().enumerate(), |_, error| Err(error))
}

/// Keeps `rows` as JSON for `table`, whose columns are not known yet (PostgreSQL could not
/// be asked). Values are still checked for what no column type can hold.
///
/// # Errors
/// The first value holding a NUL character.
pub fn encode_unchecked(table: &TableName, rows: &[Row<'_>]) -> Result<Groups, RowError> {
    encode_unchecked_with(table, rows.iter().enumerate(), |_, error| Err(error))
}

/// Encodes the rows of one request as [`parse_each`] gave them: as COPY text for
/// `schema`'s table, or, when `schema` is `None` (PostgreSQL could not be asked), as JSON
/// for `table`. With [`Invalid::DeadLetter`] every row refused, at parsing or here, is kept
/// in refused-row groups for the table (the resolved one when `schema` is known) and listed
/// in [`Encoded::refused`]; those rows count in the groups' rows like any other, so each
/// takes one LSN. With [`Invalid::Reject`] the caller has refused unparsed rows already.
///
/// # Errors
/// With [`Invalid::Reject`], the first row that cannot be stored (see [`encode`] and
/// [`encode_unchecked`]); never with [`Invalid::DeadLetter`].
pub fn encode_parsed(
    table: &TableName,
    schema: Option<&TableSchema>,
    rows: &[Parsed<'_>],
    invalid: Invalid,
) -> Result<Encoded, RowError> {
    let mut refused: Vec<(usize, RowRefusal)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, row)| Some((i, row.as_ref().err()?.error.clone().into())))
        .collect();
    let parsed = rows
        .iter()
        .enumerate()
        .filter_map(|(i, row)| Some((i, row.as_ref().ok()?)));
    let mut set_aside = Vec::new();
    let on_refused = |i: usize, error: RowError| match invalid {
        Invalid::Reject => Err(error),
        Invalid::DeadLetter => {
            set_aside.push((i, error.into()));
            Ok(())
        }
    };
    let mut groups = match schema {
        Some(schema) => encode_with(schema, parsed, on_refused)?,
        None => encode_unchecked_with(table, parsed, on_refused)?,
    };
    if set_aside.is_empty() && refused.is_empty() {
        return Ok(Encoded { groups, refused });
    }
    refused.append(&mut set_aside);
    refused.sort_unstable_by_key(|(i, _)| *i);
    let mut builder = RowGroupBuilder::refused(schema.map_or(table, TableSchema::table));
    for (i, why) in &refused {
        let text = match &rows[*i] {
            Ok(row) => row.raw,
            Err(unparsed) => unparsed.raw,
        };
        if text.contains('\0') {
            // PostgreSQL's text cannot hold the raw character (its \u0000 escape is kept
            // as sent, six characters, like every other escape).
            builder.push_refused_row(
                &text.replace('\0', "\\u0000"),
                &format!("{why} (its raw NUL characters are written \\u0000 here)"),
            );
        } else {
            builder.push_refused_row(text, &why.to_string());
        }
        if builder.len() >= TARGET_GROUP_BYTES {
            groups.push(builder.take());
        }
    }
    if !builder.is_empty() {
        groups.push(builder.take());
    }
    Ok(Encoded { groups, refused })
}

/// The encoder behind [`encode`] and [`encode_parsed`]: `rows` come with their index in
/// the request, and each row that cannot be stored goes to `refused`, which ends the
/// encoding with an error or lets it go on without the row.
fn encode_with<'r, 'a: 'r, E>(
    schema: &TableSchema,
    rows: impl IntoIterator<Item = (usize, &'r Row<'a>)>,
    mut refused: impl FnMut(usize, RowError) -> Result<(), E>,
) -> Result<Groups, E> {
    let mut builders: Vec<RowGroupBuilder> = Vec::new();
    let mut by_columns: HashMap<Vec<u16>, usize> = HashMap::new();
    let mut done: Groups = Vec::new();
    // The columns of the last shape resolved: rows of one shape skip the name lookups.
    let mut resolved: Option<Resolved> = None;
    'rows: for (index, row) in rows {
        if resolved.as_ref().is_none_or(|r| r.shape != row.shape) {
            resolved = None;
            match resolve(schema, row, &mut builders, &mut by_columns) {
                Ok(r) => resolved = Some(r),
                Err(error) => {
                    refused(index, error)?;
                    continue 'rows;
                }
            }
        }
        let Resolved { order, slot, .. } = resolved.as_ref().expect("resolved above");
        let builder = &mut builders[*slot];
        let row_start = builder.len();
        for (n, &(field, column)) in order.iter().enumerate() {
            let column = &schema.columns()[usize::from(column)];
            let out = builder.row_buf();
            if n > 0 {
                out.push(b'\t');
            }
            if let Err(error) = copy::encode_field(&column.kind, row.fields[field].1, out) {
                builder.abandon_row(row_start);
                refused(
                    index,
                    RowError::Value {
                        position: row.position,
                        column: column.name.clone(),
                        error,
                    },
                )?;
                continue 'rows;
            }
        }
        builder.end_copy_row();
        if builder.len() >= TARGET_GROUP_BYTES {
            done.push(builder.take());
        }
    }
    done.extend(
        builders
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(RowGroupBuilder::take),
    );
    Ok(done)
}

/// A row shape's columns, as [`resolve`] found them.
struct Resolved {
    /// The [`Row::shape`] resolved.
    shape: u32,
    /// `(index in the row's fields, column position)` in table order.
    order: Vec<(usize, u16)>,
    /// The row group builder of this column set.
    slot: usize,
}

/// Finds the columns of `row`'s keys and the group of its column set (made if new).
///
/// # Errors
/// A key that is not a column, or a generated column.
fn resolve(
    schema: &TableSchema,
    row: &Row<'_>,
    builders: &mut Vec<RowGroupBuilder>,
    by_columns: &mut HashMap<Vec<u16>, usize>,
) -> Result<Resolved, RowError> {
    let mut order = Vec::with_capacity(row.fields.len());
    for (field, (name, _)) in row.fields.iter().enumerate() {
        let Some(i) = schema.position(name) else {
            return Err(if name.contains('\0') {
                RowError::Value {
                    position: row.position,
                    column: name.to_string(),
                    error: ValueError::Nul,
                }
            } else {
                RowError::UnknownColumn {
                    position: row.position,
                    column: name.to_string(),
                    table: schema.table().clone(),
                }
            });
        };
        let column = &schema.columns()[i];
        if column.generated {
            return Err(RowError::GeneratedColumn {
                position: row.position,
                column: column.name.clone(),
            });
        }
        order.push((field, u16::try_from(i).expect("at most 1600 columns")));
    }
    order.sort_unstable_by_key(|&(_, column)| column);
    let key: Vec<u16> = order.iter().map(|&(_, column)| column).collect();
    let slot = match by_columns.get(&key) {
        Some(&slot) => slot,
        None => {
            let names: Vec<&str> = key
                .iter()
                .map(|&i| schema.columns()[usize::from(i)].name.as_str())
                .collect();
            builders.push(RowGroupBuilder::copy(schema.table(), &names));
            by_columns.insert(key, builders.len() - 1);
            builders.len() - 1
        }
    };
    Ok(Resolved {
        shape: row.shape,
        order,
        slot,
    })
}

/// The encoder behind [`encode_unchecked`] and [`encode_parsed`] (see [`encode_with`]).
fn encode_unchecked_with<'r, 'a: 'r, E>(
    table: &TableName,
    rows: impl IntoIterator<Item = (usize, &'r Row<'a>)>,
    mut refused: impl FnMut(usize, RowError) -> Result<(), E>,
) -> Result<Groups, E> {
    let mut builder = RowGroupBuilder::json(table);
    let mut done = Vec::new();
    'rows: for (index, row) in rows {
        for (name, value) in &row.fields {
            let nul = name.contains('\0').then_some(ValueError::Nul);
            if let Some(error) = nul.or_else(|| copy::check_value(value).err()) {
                refused(
                    index,
                    RowError::Value {
                        position: row.position,
                        column: name.to_string(),
                        error,
                    },
                )?;
                continue 'rows;
            }
        }
        builder.push_json_row(row.raw);
        if builder.len() >= TARGET_GROUP_BYTES {
            done.push(builder.take());
        }
    }
    if !builder.is_empty() {
        done.push(builder.take());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::ColumnKind;
    use crate::rowgroup::RowGroup;
    use crate::schema::Column;

    fn schema() -> TableSchema {
        let col = |name: &str, kind| Column {
            name: name.into(),
            kind,
            generated: name == "gen",
        };
        TableSchema::new(
            TableName {
                schema: Some("public".into()),
                name: "t".into(),
            },
            vec![
                col("id", ColumnKind::Scalar),
                col("note", ColumnKind::Scalar),
                col("doc", ColumnKind::Jsonb),
                col("gen", ColumnKind::Scalar),
            ],
        )
    }

    fn bodies(groups: &Groups) -> Vec<(Vec<String>, String)> {
        groups
            .iter()
            .map(|(_, p)| {
                let g = RowGroup::decode(p).expect("decode");
                (
                    g.columns.iter().map(|c| c.to_string()).collect(),
                    String::from_utf8(g.body.to_vec()).expect("utf8"),
                )
            })
            .collect()
    }

    #[test]
    fn bodies_of_every_shape_parse_with_positions() {
        let one = parse(r#" {"id": 1} "#, BodyFormat::Json).expect("object");
        assert_eq!(one[0].position, RowPosition::Single);
        let arr = parse(r#"[{"id":1},{"id":2}]"#, BodyFormat::Json).expect("array");
        assert_eq!(arr[1].position, RowPosition::Index(1));
        assert_eq!(arr[1].raw, r#"{"id":2}"#);
        let nd = parse("{\"id\":1}\n\n  \r\n{\"id\":2}\r\n", BodyFormat::Ndjson).expect("ndjson");
        assert_eq!(nd.len(), 2);
        assert_eq!(nd[1].position, RowPosition::Line(4));
        assert_eq!(nd[1].raw, r#"{"id":2}"#);
    }

    #[test]
    fn bad_bodies_name_the_row() {
        let e = parse("{\"id\":1}\n[1,2]\n", BodyFormat::Ndjson).unwrap_err();
        assert_eq!(
            e,
            BodyError::NotAnObject {
                position: RowPosition::Line(2),
                found: "an array"
            }
        );
        let e = parse(r#"[{"id":1}, 7]"#, BodyFormat::Json).unwrap_err();
        assert_eq!(
            e.to_string(),
            "row at index 1: a row must be a JSON object, found a number"
        );
        let e = parse(r#"{"a":1,"b":2,"a":3}"#, BodyFormat::Json).unwrap_err();
        assert_eq!(
            e,
            BodyError::DuplicateKey {
                position: RowPosition::Single,
                key: "a".into()
            }
        );
        // An escaped key equal to another is the same key.
        assert!(matches!(
            parse(r#"{"a":1,"\u0061":2}"#, BodyFormat::Json),
            Err(BodyError::DuplicateKey { .. })
        ));
        let e = parse("{\"id\":1}\n{\"id\":\n", BodyFormat::Ndjson).unwrap_err();
        assert!(
            matches!(
                e,
                BodyError::Malformed {
                    position: RowPosition::Line(2),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            parse("{\"id\":1} {}", BodyFormat::Json),
            Err(BodyError::Malformed { .. })
        ));
        assert_eq!(
            parse("\n \n", BodyFormat::Ndjson).unwrap_err(),
            BodyError::Empty
        );
        assert_eq!(parse("[]", BodyFormat::Json).unwrap_err(), BodyError::Empty);
    }

    #[test]
    fn rows_group_by_column_set_in_table_order() {
        let rows = parse(
            "{\"note\":\"a\",\"id\":1}\n{\"id\":2}\n{\"id\":3,\"note\":null}\n",
            BodyFormat::Ndjson,
        )
        .expect("parse");
        let groups = encode(&schema(), &rows).expect("encode");
        assert_eq!(
            bodies(&groups),
            vec![
                (vec!["id".into(), "note".into()], "1\ta\n3\t\\N\n".into()),
                (vec!["id".into()], "2\n".into()),
            ]
        );
        assert_eq!(groups.iter().map(|g| g.0).sum::<u32>(), 3);
    }

    #[test]
    fn unknown_generated_and_bad_values_are_refused_with_their_row() {
        let rows = parse("{\"id\":1}\n{\"nope\":1}\n", BodyFormat::Ndjson).expect("parse");
        let e = encode(&schema(), &rows).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: column \"nope\" does not exist in table public.t"
        );
        let rows = parse(r#"[{"gen":1}]"#, BodyFormat::Json).expect("parse");
        assert!(matches!(
            encode(&schema(), &rows),
            Err(RowError::GeneratedColumn { .. })
        ));
        let rows = parse(r#"{"doc":{"k":"\u0000"}}"#, BodyFormat::Json).expect("parse");
        assert!(matches!(
            encode(&schema(), &rows),
            Err(RowError::Value {
                error: ValueError::Nul,
                ..
            })
        ));
    }

    #[test]
    fn unchecked_rows_keep_their_json_and_still_refuse_nul() {
        let table = TableName {
            schema: None,
            name: "later".into(),
        };
        let rows = parse("{\"a\": [1, 2]}\n{\"b\":\"x\"}\n", BodyFormat::Ndjson).expect("parse");
        let groups = encode_unchecked(&table, &rows).expect("encode");
        let g = RowGroup::decode(&groups[0].1).expect("decode");
        let stored: Vec<_> = g.json_rows().collect::<Result<_, _>>().expect("rows");
        assert_eq!(stored, vec!["{\"a\": [1, 2]}", "{\"b\":\"x\"}"]);
        let rows = parse(r#"{"a":"x\u0000"}"#, BodyFormat::Json).expect("parse");
        assert!(encode_unchecked(&table, &rows).is_err());
        let rows = parse(r#"{"a\u0000":1}"#, BodyFormat::Json).expect("parse");
        assert!(encode_unchecked(&table, &rows).is_err());
    }

    #[test]
    fn parse_each_keeps_bad_rows_among_the_others_with_their_text() {
        let rows = parse_each(
            "{\"id\":1}\n[1,2,3]\n\n{\"id\":\n{\"a\":1,\"a\":2}\n",
            BodyFormat::Ndjson,
        )
        .expect("parse");
        assert_eq!(rows.len(), 4);
        assert!(rows[0].is_ok());
        let bad: Vec<(&str, String)> = rows[1..]
            .iter()
            .map(|r| {
                let u = r.as_ref().unwrap_err();
                (u.raw, u.error.to_string())
            })
            .collect();
        assert_eq!(
            bad[0],
            (
                "[1,2,3]",
                "line 2: a row must be a JSON object, found an array".into()
            )
        );
        assert_eq!(bad[1].0, "{\"id\":");
        assert!(
            bad[1].1.starts_with("line 4: malformed JSON"),
            "{}",
            bad[1].1
        );
        assert_eq!(bad[2].1, "line 5: key \"a\" is given twice");
        // A body that cannot be split into rows is refused as a whole.
        assert!(matches!(
            parse_each("[{\"id\":1}, {\"id\"", BodyFormat::Json),
            Err(BodyError::Malformed { .. })
        ));
        assert!(matches!(
            parse_each("{\"id\":", BodyFormat::Json),
            Err(BodyError::Malformed { .. })
        ));
        let single = parse_each("7", BodyFormat::Json).expect("parse");
        assert!(matches!(
            single[0],
            Err(Unparsed {
                error: BodyError::NotAnObject { .. },
                ..
            })
        ));
    }

    #[test]
    fn dead_letter_keeps_valid_rows_and_refused_rows_apart() {
        let table = schema().table().clone();
        let body =
            "{\"id\":1}\n{\"nope\":1}\n[1]\n{\"id\":2,\"note\":\"x\"}\n{\"doc\":\"\\u0000\"}\n";
        let parsed = parse_each(body, BodyFormat::Ndjson).expect("parse");
        let encoded =
            encode_parsed(&table, Some(&schema()), &parsed, Invalid::DeadLetter).expect("encode");
        let refused: Vec<(usize, String)> = encoded
            .refused
            .iter()
            .map(|(i, e)| (*i, e.to_string()))
            .collect();
        assert_eq!(
            refused,
            vec![
                (
                    1,
                    "line 2: column \"nope\" does not exist in table public.t".into()
                ),
                (
                    2,
                    "line 3: a row must be a JSON object, found an array".into()
                ),
                (
                    4,
                    "line 5: column \"doc\": text and jsonb cannot hold a NUL character (\\u0000)"
                        .into()
                ),
            ]
        );
        // Every row takes one LSN: kept and refused rows together are the request's rows.
        assert_eq!(encoded.groups.iter().map(|g| g.0).sum::<u32>(), 5);
        let (rows, payload) = encoded.groups.last().expect("a refused group");
        assert_eq!(*rows, 3);
        let g = RowGroup::decode(payload).expect("decode");
        assert_eq!(g.format, crate::rowgroup::RowFormat::Refused);
        assert_eq!(g.table, table);
        let stored: Vec<(&str, &str)> = g.refused_rows().collect::<Result<_, _>>().expect("rows");
        assert_eq!(stored[0], ("{\"nope\":1}", refused[0].1.as_str()));
        assert_eq!(stored[1], ("[1]", refused[1].1.as_str()));
        assert_eq!(stored[2].0, "{\"doc\":\"\\u0000\"}");
        assert_eq!(
            bodies(&encoded.groups[..2].to_vec()),
            vec![
                (vec!["id".into()], "1\n".into()),
                (vec!["id".into(), "note".into()], "2\tx\n".into()),
            ]
        );
    }

    #[test]
    fn reject_and_unchecked_go_through_the_same_encoder() {
        let table = schema().table().clone();
        let parsed = parse_each(
            "{\"id\":1}\n{\"gen\":1}\n{\"nope\":1}\n",
            BodyFormat::Ndjson,
        )
        .expect("parse");
        let e = encode_parsed(&table, Some(&schema()), &parsed, Invalid::Reject).unwrap_err();
        assert!(matches!(e, RowError::GeneratedColumn { .. }), "{e:?}");
        let clean = parse_each("{\"id\":1}\n", BodyFormat::Ndjson).expect("parse");
        let encoded =
            encode_parsed(&table, Some(&schema()), &clean, Invalid::DeadLetter).expect("encode");
        assert!(encoded.refused.is_empty());
        assert_eq!(encoded.groups.len(), 1);
        // Unknown columns: rows kept as JSON, a NUL still refused per row.
        let later = TableName {
            schema: None,
            name: "later".into(),
        };
        let parsed =
            parse_each("{\"a\":\"\\u0000\"}\n{\"b\":1}\n", BodyFormat::Ndjson).expect("parse");
        let encoded = encode_parsed(&later, None, &parsed, Invalid::DeadLetter).expect("encode");
        assert_eq!(encoded.refused.len(), 1);
        assert_eq!(encoded.refused[0].0, 0);
        let formats: Vec<_> = encoded
            .groups
            .iter()
            .map(|(_, p)| RowGroup::decode(p).expect("decode").format)
            .collect();
        assert_eq!(
            formats,
            vec![
                crate::rowgroup::RowFormat::Json,
                crate::rowgroup::RowFormat::Refused
            ]
        );
        assert!(encode_parsed(&later, None, &parsed, Invalid::Reject).is_err());
    }

    #[test]
    fn a_raw_nul_in_a_refused_row_is_written_as_its_escape() {
        let table = schema().table().clone();
        let parsed =
            parse_each("{\"id\":1}\n{\"note\":\"a\0b\"}\n", BodyFormat::Ndjson).expect("parse");
        let encoded =
            encode_parsed(&table, Some(&schema()), &parsed, Invalid::DeadLetter).expect("encode");
        assert_eq!(encoded.refused.len(), 1);
        let (_, payload) = encoded.groups.last().expect("a refused group");
        let g = RowGroup::decode(payload).expect("decode");
        let stored: Vec<(&str, &str)> = g.refused_rows().collect::<Result<_, _>>().expect("rows");
        assert_eq!(stored[0].0, "{\"note\":\"a\\u0000b\"}");
        assert!(
            stored[0]
                .1
                .ends_with("(its raw NUL characters are written \\u0000 here)")
        );
    }
}
