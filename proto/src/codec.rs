//! The protobuf codec of the broker API: prost's, except that a message which does not decode
//! is the sender's fault and answered with `INVALID_ARGUMENT` naming where decoding stopped
//! (prost's own codec answers `INTERNAL`, which tells a client nothing about its request).

use std::marker::PhantomData;

use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct BrokerCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for BrokerCodec<T, U> {
    fn default() -> Self {
        BrokerCodec { inner: ProstCodec::default() }
    }
}

impl<T, U> Codec for BrokerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BrokerDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BrokerDecoder { inner: self.inner.decoder(), _pd: PhantomData }
    }
}

#[derive(Debug)]
pub struct BrokerDecoder<U> {
    inner: ProstDecoder<U>,
    _pd: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for BrokerDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|s| match s.code() {
            Code::Internal => Status::invalid_argument(format!("the message does not decode: {}", s.message())),
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
