//! The agent <-> region wire protocol, generated from `proto/agent.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("meridian.agent.v1");
}

pub use v1::*;

/// The largest message either side accepts (a node's full desired pod set fits easily).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
