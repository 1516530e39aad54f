//! Integration tests: real PostgreSQL servers started by the harness, real sockets, real
//! files. One binary, a module per area.

mod access;
mod ack_levels;
mod bench;
mod bounded_start;
mod crash_states;
mod dataset;
mod dead_letters;
mod dead_letters_cli;
mod demo;
mod edge_cases;
mod fdatasync_failure;
mod harness;
mod http_api;
mod limits;
mod load;
mod log_formats;
mod metrics;
mod pg_faults;
mod pgtemp;
mod recovery;
mod row_isolation;
mod send;
mod send_stream;
mod service;
mod status;
mod status_live;
mod supply_chain;
mod systemd_units;
mod table_access;
mod torn_writes;
mod torture;
mod wal_damage;
mod wal_limits;
