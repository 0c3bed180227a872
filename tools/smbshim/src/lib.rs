//! smbshim's server as a library: the binary (main.rs) serves TCP with
//! it, and the fuzz targets drive its request handling directly
//! ([`server::Harness`]).
#![forbid(unsafe_code)]

mod closes_made;
mod early_breaks;
mod handover;
mod open_table;
pub mod server;
mod unanswered;
