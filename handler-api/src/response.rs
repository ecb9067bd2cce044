//! The response a handler returns; owned (or `'static`), so it outlives the
//! call.
//!
//! Header names and values are [`RCowStr<'static>`]: a `&'static str` (a
//! literal, the usual case) crosses the boundary without being copied or
//! allocated, a `String` is handed over as is. The content type has its own
//! field because nearly every response sets one: [`Response::text`] costs a
//! single allocation (the body).

use abi_stable::{
    std_types::{RCow, RCowStr, RVec},
    StableAbi,
};

/// `Response::text`'s content type.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// One response header.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Header name (case-insensitive; sent in lower case).
    pub name: RCowStr<'static>,
    /// Header value: visible ASCII, spaces and tabs.
    pub value: RCowStr<'static>,
}

/// An HTTP response.
///
/// The host checks every header: an invalid name or value is dropped and
/// logged, an invalid status becomes a `500`. `content-length` is set by the
/// host.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code; anything outside 100..=999 is answered as `500`.
    pub status: u16,
    /// The `content-type` header; empty for none.
    pub content_type: RCowStr<'static>,
    /// Other headers, in order.
    pub headers: RVec<ResponseHeader>,
    /// The body.
    pub body: RVec<u8>,
}

impl Response {
    /// A response with a status and a body, and no header.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type: RCow::Borrowed("".into()),
            headers: RVec::new(),
            body: RVec::from(body.into()),
        }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status, body).with_content_type(TEXT_PLAIN)
    }

    /// Sets the content type: `"application/json"` (a `&'static str` is not
    /// copied) or an owned `String`.
    pub fn with_content_type(mut self, value: impl Into<RCowStr<'static>>) -> Self {
        self.content_type = value.into();
        self
    }

    /// Adds a header. Names and values are `&'static str` (not copied) or
    /// owned `String`s; a `content-type` header sets
    /// [`Response::content_type`].
    pub fn with_header(
        mut self,
        name: impl Into<RCowStr<'static>>,
        value: impl Into<RCowStr<'static>>,
    ) -> Self {
        let name = name.into();
        if name.as_str().eq_ignore_ascii_case("content-type") {
            return self.with_content_type(value);
        }
        self.headers.push(ResponseHeader {
            name,
            value: value.into(),
        });
        self
    }

    /// The content type, `""` when none is set.
    pub fn content_type(&self) -> &str {
        self.content_type.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_headers_are_borrowed_and_owned_ones_kept() {
        let response = Response::text(200, "hi")
            .with_header("x-static", "yes")
            .with_header(String::from("x-owned"), format!("{}", 7));
        assert_eq!(response.content_type(), TEXT_PLAIN);
        assert!(matches!(response.content_type, RCow::Borrowed(_)));
        assert!(matches!(response.headers[0].name, RCow::Borrowed(_)));
        assert!(matches!(response.headers[1].value, RCow::Owned(_)));
        assert_eq!(response.headers[1].value.as_str(), "7");
        assert_eq!(response.body.as_slice(), b"hi");
    }

    #[test]
    fn a_content_type_header_sets_the_content_type() {
        let response = Response::new(200, "{}").with_header("Content-Type", "application/json");
        assert_eq!(response.content_type(), "application/json");
        assert!(response.headers.is_empty());
        assert_eq!(Response::new(204, "").content_type(), "");
    }
}
