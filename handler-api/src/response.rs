//! The response a handler returns; owned, so it outlives the call.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// One response header.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Header name.
    pub name: RString,
    /// Header value.
    pub value: RString,
}

/// An HTTP response.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code; anything outside 100..=999 is answered as `500`.
    pub status: u16,
    /// Extra headers; `content-length` is set by the host.
    pub headers: RVec<ResponseHeader>,
    /// The body.
    pub body: RVec<u8>,
}

impl Response {
    /// A response with a status and a body, and no extra header.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: RVec::new(),
            body: RVec::from(body.into()),
        }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status, body).with_header("content-type", "text/plain; charset=utf-8")
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push(ResponseHeader {
            name: name.into(),
            value: value.into(),
        });
        self
    }
}
