//! `?ack=committed`: requests that wait until PostgreSQL holds their rows.
//!
//! A request appends its rows (durably, as ever), then registers its LSN range and its
//! table, named as its WAL records name it ([`crate::table::TableName`]'s display: the
//! schema-qualified name the catalog resolved, or the client's name for rows kept as JSON),
//! with [`Acks::wait`]. No request has a transaction of its own: all of them wait on the
//! flusher's ordinary batches, so one commit answers every request it covers.
//!
//! The flusher reports every commit with [`Acks::settled`] (and once at each session's
//! start, with the watermark it read and the tables held). A waiting request is answered:
//!
//! - [`Outcome::Held`] at once when its table is held by a schema or permission error
//!   from an LSN before the request's last (its rows stay in the WAL and are loaded once
//!   the table is fixed);
//! - otherwise [`Outcome::Committed`] once the watermark covers its last LSN, with the rows
//!   of its range that the commits dead-lettered;
//! - [`Outcome::Stopped`] when the daemon stops first ([`Acks::close`]).
//!
//! Only `settled` answers requests, not the committed watermark the flusher also
//! publishes on its watch channel: a commit's dead letters and holds come with its
//! watermark, so no answer goes out before they are known.
//!
//! **Late registrations.** The writer publishes the durable LSN before the append returns,
//! so the flusher may commit a request's rows before it registers. Registration therefore
//! checks the watermark and the held tables under the same lock that `settled` takes, and
//! the dead letters of recent commits are kept: the last [`DEAD_LETTER_HISTORY`] of them
//! (about 100 bytes each plus their messages). A request that registers after more than
//! that many rows were dead-lettered past its first LSN may miss some of its own in the
//! answer (they are in `pgspool.dead_letters` all the same).
//!
//! **No waiting for a batch to be due.** A batch is normally loaded once it is full or
//! its oldest row has waited `[batch] max_wait`. A waiting request would pay that wait
//! on every call, so the flusher loads what it has read as soon as a request waits and
//! it has read everything durable ([`Acks::waiting`], [`Acks::registered`]). Requests that
//! arrive while a COPY runs share the next one, as group commit shares an fdatasync.
//!
//! **Memory.** Besides that history, one small entry per waiting request, removed when
//! the request is answered or dropped (its client disconnected).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, oneshot};

use crate::lsn::{Lsn, LsnRange};

/// How many dead letters of recent commits are kept for requests that register after
/// their commit (see the module docs).
pub const DEAD_LETTER_HISTORY: usize = 65_536;

/// A row that a commit put into `pgspool.dead_letters` instead of its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterAck {
    /// The row's LSN.
    pub lsn: Lsn,
    /// The row's table as its WAL record names it ([`crate::table::TableName`]'s display).
    pub table: String,
    /// PostgreSQL's SQLSTATE; `None` when pgspool's own encoder refused the row.
    pub sqlstate: Option<String>,
    /// Why the row was refused.
    pub message: String,
}

/// A table whose rows after `lsn` are held in the WAL by a schema or permission error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTable {
    /// The table as its WAL records name it.
    pub table: String,
    /// Rows of this table up to this LSN are committed; those after it are held.
    pub lsn: Lsn,
    /// The error that holds it: SQLSTATE and message.
    pub error: String,
}

/// How a waiting request ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The watermark covers the request's rows: every one is committed, in its table or,
    /// for these, in `pgspool.dead_letters` (sorted by LSN).
    Committed {
        /// The request's rows that were dead-lettered.
        dead_letters: Vec<DeadLetterAck>,
    },
    /// The request's table is held: its rows are durable in the WAL and are loaded once
    /// the table is fixed.
    Held(HeldTable),
    /// The daemon is stopping; the rows are durable in the WAL and are loaded after the
    /// next start.
    Stopped,
}

/// Requests waiting for their rows to be committed (see the module docs).
#[derive(Debug, Default)]
pub struct Acks {
    state: Mutex<State>,
    /// Woken when a request starts to wait.
    registered: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// The last watermark reported.
    watermark: Lsn,
    /// The tables held as of the last report.
    held: Vec<HeldTable>,
    /// Dead letters of recent commits, by LSN, at most [`DEAD_LETTER_HISTORY`].
    history: VecDeque<DeadLetterAck>,
    waiters: HashMap<u64, Waiter>,
    next_id: u64,
    /// The daemon is stopping: every request is answered [`Outcome::Stopped`].
    closed: bool,
}

#[derive(Debug)]
struct Waiter {
    table: String,
    lsns: LsnRange,
    reply: oneshot::Sender<Outcome>,
}

impl State {
    /// How a request for `table` and `lsns` ends now, if it does.
    fn outcome(&self, table: &str, lsns: LsnRange) -> Option<Outcome> {
        if self.closed {
            return Some(Outcome::Stopped);
        }
        if let Some(held) = self
            .held
            .iter()
            .find(|h| h.table == table && h.lsn < lsns.last)
        {
            return Some(Outcome::Held(held.clone()));
        }
        if self.watermark < lsns.last {
            return None;
        }
        let from = self.history.partition_point(|d| d.lsn < lsns.first);
        let dead_letters = self
            .history
            .range(from..)
            .take_while(|d| d.lsn <= lsns.last)
            .cloned()
            .collect();
        Some(Outcome::Committed { dead_letters })
    }

    /// Answers every waiter whose request ends now.
    fn answer(&mut self) {
        let done: Vec<(u64, Outcome)> = self
            .waiters
            .iter()
            .filter_map(|(id, w)| Some((*id, self.outcome(&w.table, w.lsns)?)))
            .collect();
        for (id, outcome) in done {
            if let Some(waiter) = self.waiters.remove(&id) {
                let _ = waiter.reply.send(outcome);
            }
        }
    }
}

impl Acks {
    /// No request waiting, nothing committed yet.
    #[must_use]
    pub fn new() -> Acks {
        Acks::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left nothing half-done worth refusing over.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a commit: the watermark is now `watermark`, `dead_letters` are the rows the
    /// commit dead-lettered (sorted by LSN), `held` every table held after it. Answers the
    /// requests this ends.
    pub fn settled(&self, watermark: Lsn, dead_letters: &[DeadLetterAck], held: &[HeldTable]) {
        let mut state = self.state();
        state.watermark = watermark;
        state.held = held.to_vec();
        for dead in dead_letters {
            // A session that sends rows again (the database was restored from a backup)
            // reports their dead letters again: keep one of each, in LSN order.
            while state.history.back().is_some_and(|d| d.lsn >= dead.lsn) {
                state.history.pop_back();
            }
            if state.history.len() == DEAD_LETTER_HISTORY {
                state.history.pop_front();
            }
            state.history.push_back(dead.clone());
        }
        state.answer();
    }

    /// Registers a request whose rows of `table` (as its WAL records name it) took `lsns`
    /// and are durable. Checks at once whether it is already settled (the flusher may have
    /// committed its rows before it registers).
    #[must_use]
    pub fn wait(self: &Arc<Self>, table: String, lsns: LsnRange) -> Waiting {
        let (reply, answer) = oneshot::channel();
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        match state.outcome(&table, lsns) {
            Some(outcome) => {
                let _ = reply.send(outcome);
            }
            None => {
                state.waiters.insert(id, Waiter { table, lsns, reply });
                self.registered.notify_one();
            }
        }
        Waiting {
            acks: Arc::clone(self),
            id,
            answer,
        }
    }

    /// The daemon is stopping: answers every waiting request, and every later one at once,
    /// with [`Outcome::Stopped`].
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.answer();
    }

    /// How many requests are waiting.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.state().waiters.len()
    }

    /// Returns once a request has started to wait since the last call returned (at once
    /// if one did in between). Meant for one task, the flusher.
    pub async fn registered(&self) {
        self.registered.notified().await;
    }
}

/// A registered request; dropping it (the client went away) unregisters it.
#[derive(Debug)]
pub struct Waiting {
    acks: Arc<Acks>,
    id: u64,
    answer: oneshot::Receiver<Outcome>,
}

impl Waiting {
    /// Waits until the request is settled.
    pub async fn outcome(&mut self) -> Outcome {
        // The sender is dropped unanswered only if the entry was removed without an answer,
        // which only `Drop` does; stopping is the honest answer should it ever happen.
        (&mut self.answer).await.unwrap_or(Outcome::Stopped)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.acks.state().waiters.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u64, last: u64) -> LsnRange {
        LsnRange {
            first: Lsn(first),
            last: Lsn(last),
        }
    }

    fn dead(lsn: u64) -> DeadLetterAck {
        DeadLetterAck {
            lsn: Lsn(lsn),
            table: "public.t".into(),
            sqlstate: Some("22003".into()),
            message: format!("row {lsn} out of range"),
        }
    }

    fn now(waiting: &mut Waiting) -> Option<Outcome> {
        waiting.answer.try_recv().ok()
    }

    #[test]
    fn commits_answer_the_requests_they_cover_with_their_dead_letters() {
        let acks = Arc::new(Acks::new());
        let mut a = acks.wait("public.t".into(), range(1, 3));
        let mut b = acks.wait("public.t".into(), range(4, 6));
        acks.settled(Lsn(3), &[dead(2)], &[]);
        assert_eq!(
            now(&mut a),
            Some(Outcome::Committed {
                dead_letters: vec![dead(2)]
            })
        );
        assert_eq!(now(&mut b), None);
        assert_eq!(acks.waiting(), 1);
        acks.settled(Lsn(9), &[dead(5), dead(7)], &[]);
        assert_eq!(
            now(&mut b),
            Some(Outcome::Committed {
                dead_letters: vec![dead(5)]
            })
        );
        assert_eq!(acks.waiting(), 0);
    }

    #[test]
    fn a_late_registration_gets_the_watermark_and_its_dead_letters() {
        let acks = Arc::new(Acks::new());
        acks.settled(Lsn(10), &[dead(3), dead(8)], &[]);
        let mut late = acks.wait("public.t".into(), range(7, 9));
        assert_eq!(
            now(&mut late),
            Some(Outcome::Committed {
                dead_letters: vec![dead(8)]
            })
        );
        assert_eq!(acks.waiting(), 0);
    }

    #[test]
    fn a_held_table_answers_at_once_and_other_tables_wait() {
        let acks = Arc::new(Acks::new());
        let held = HeldTable {
            table: "public.t".into(),
            lsn: Lsn(4),
            error: "42703: column \"x\" does not exist".into(),
        };
        let mut before = acks.wait("public.t".into(), range(2, 4));
        let mut t = acks.wait("public.t".into(), range(5, 6));
        let mut other = acks.wait("public.u".into(), range(7, 7));
        acks.settled(Lsn(4), &[], std::slice::from_ref(&held));
        assert_eq!(
            now(&mut before),
            Some(Outcome::Committed {
                dead_letters: vec![]
            })
        );
        assert_eq!(now(&mut t), Some(Outcome::Held(held.clone())));
        assert_eq!(now(&mut other), None);
        let mut next = acks.wait("public.t".into(), range(8, 8));
        assert_eq!(now(&mut next), Some(Outcome::Held(held)));
        acks.settled(Lsn(7), &[], &[]);
        assert_eq!(
            now(&mut other),
            Some(Outcome::Committed {
                dead_letters: vec![]
            })
        );
    }

    #[test]
    fn close_stops_waiters_and_later_ones_and_drop_unregisters() {
        let acks = Arc::new(Acks::new());
        let gone = acks.wait("public.t".into(), range(1, 1));
        assert_eq!(acks.waiting(), 1);
        drop(gone);
        assert_eq!(acks.waiting(), 0);
        let mut a = acks.wait("public.t".into(), range(2, 2));
        acks.close();
        assert_eq!(now(&mut a), Some(Outcome::Stopped));
        let mut b = acks.wait("public.t".into(), range(3, 3));
        assert_eq!(now(&mut b), Some(Outcome::Stopped));
        assert_eq!(acks.waiting(), 0);
    }

    #[test]
    fn the_history_is_bounded_and_replays_are_kept_once() {
        let acks = Acks::new();
        let many: Vec<_> = (1..=DEAD_LETTER_HISTORY as u64 + 10).map(dead).collect();
        acks.settled(Lsn(many.len() as u64), &many, &[]);
        acks.settled(Lsn(many.len() as u64), &many[many.len() - 5..], &[]);
        let state = acks.state();
        assert_eq!(state.history.len(), DEAD_LETTER_HISTORY);
        assert_eq!(state.history.front().map(|d| d.lsn), Some(Lsn(11)));
        assert!(
            state
                .history
                .iter()
                .zip(state.history.iter().skip(1))
                .all(|(a, b)| a.lsn < b.lsn)
        );
    }
}
