//! The exact check that ends every scenario of `pgspool bench`: PostgreSQL holds exactly
//! the rows sent, each once, and pgspool set none aside as a dead letter.

use anyhow::{Context, bail};
use tokio_postgres::Client;
use uuid::Uuid;

/// Checks that `table` (a name as it goes into SQL) holds exactly the rows of ids
/// `1..=sent`, each once: `count(*)`, `count(DISTINCT id)`, `min(id)` and `max(id)` are
/// `sent`, `sent`, 1 and `sent`. With `spool`, also that `pgspool.dead_letters` holds
/// no row of that spool.
///
/// # Errors
/// When the check fails (the error names the numbers found and expected) or a query
/// fails.
pub async fn check_exact(
    client: &Client,
    table: &str,
    spool: Option<Uuid>,
    sent: u64,
) -> anyhow::Result<()> {
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {table}"),
            &[],
        )
        .await
        .with_context(|| format!("counting the rows of {table}"))?;
    let count: i64 = row.get(0);
    let distinct: i64 = row.get(1);
    let min: Option<i64> = row.get(2);
    let max: Option<i64> = row.get(3);
    let expected = i64::try_from(sent).context("too many rows")?;
    let (want_min, want_max) = if sent == 0 {
        (None, None)
    } else {
        (Some(1), Some(expected))
    };
    if (count, distinct, min, max) != (expected, expected, want_min, want_max) {
        let range = |min: Option<i64>, max: Option<i64>| match (min, max) {
            (Some(min), Some(max)) => format!("ids {min} to {max}"),
            _ => "no ids".to_string(),
        };
        bail!(
            "PostgreSQL holds {count} rows with {distinct} distinct ids, {}, where {sent} rows \
             with {} were sent",
            range(min, max),
            range(want_min, want_max)
        );
    }
    if let Some(spool) = spool {
        let dead: i64 = client
            .query_one(
                "SELECT count(*) FROM pgspool.dead_letters WHERE spool_id = $1",
                &[&spool],
            )
            .await
            .context("counting the dead letters")?
            .get(0);
        if dead > 0 {
            let rows = if dead == 1 { "row" } else { "rows" };
            bail!(
                "pgspool.dead_letters holds {dead} {rows} of spool {spool}, where none should be"
            );
        }
    }
    Ok(())
}
