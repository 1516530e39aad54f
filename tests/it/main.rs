//! Integration tests: real PostgreSQL servers started by the harness, real sockets, real
//! files. One binary, a module per area.

mod crash_states;
mod dataset;
mod demo;
mod edge_cases;
mod harness;
mod http_api;
mod pgtemp;
mod recovery;
mod status;
mod torn_writes;
mod wal_damage;
mod wal_limits;
