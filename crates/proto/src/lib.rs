//! The agent <-> region wire protocol, generated from `proto/agent.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("meridian.agent.v1");
}

pub use v1::*;

/// The largest message either side accepts (a node's full desired pod set fits easily).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Prost encoding with 1 KiB starting buffers instead of tonic's 8 KiB: a region
/// holds one long-lived stream per node, and agent messages are small, so the
/// default would cost ~16 KiB of idle buffer per node (1.6 GiB at 100k nodes).
/// Buffers still grow on demand for larger messages.
#[derive(Debug, Clone, Copy)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn small() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(small())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(small())
    }
}
