//! The request a handler sees: borrowed views into the worker's buffers.

use abi_stable::{
    std_types::{RSlice, RStr},
    StableAbi,
};

/// One request header. Values are bytes: HTTP does not promise UTF-8.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Header<'a> {
    /// Lower-case header name.
    pub name: RStr<'a>,
    /// Raw header value.
    pub value: RSlice<'a, u8>,
}

/// An HTTP request, borrowed from the worker for the duration of one call.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: RStr<'a>,
    /// The path, without the query string.
    pub path: RStr<'a>,
    /// The raw query string without `?`; empty when there is none.
    pub query: RStr<'a>,
    /// Headers in the order received.
    pub headers: RSlice<'a, Header<'a>>,
    /// The whole request body.
    pub body: RSlice<'a, u8>,
    /// The client's address, `ip:port`.
    pub peer: RStr<'a>,
}

impl<'a> Request<'a> {
    /// The request method.
    pub fn method(&self) -> &'a str {
        self.method.as_str()
    }

    /// The request path, without the query string.
    pub fn path(&self) -> &'a str {
        self.path.as_str()
    }

    /// The raw query string.
    pub fn query(&self) -> &'a str {
        self.query.as_str()
    }

    /// The raw value of the first query parameter called `name`.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query().split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }

    /// The first header called `name` (case-insensitive), if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .as_slice()
            .iter()
            .find(|h| h.name.as_str().eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value.as_slice()).ok())
    }

    /// The request body.
    pub fn body(&self) -> &'a [u8] {
        self.body.as_slice()
    }

    /// The client's address.
    pub fn peer(&self) -> &'a str {
        self.peer.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(query: &'a str, headers: &'a [Header<'a>]) -> Request<'a> {
        Request {
            method: "GET".into(),
            path: "/".into(),
            query: query.into(),
            headers: headers.into(),
            body: RSlice::from_slice(b""),
            peer: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn query_param_finds_first_match_and_bare_keys() {
        let req = request("a=1&ms=250&ms=3&flag", &[]);
        assert_eq!(req.query_param("ms"), Some("250"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("missing"), None);
    }

    #[test]
    fn header_lookup_ignores_case() {
        let headers = [Header {
            name: "content-type".into(),
            value: RSlice::from_slice(b"text/plain"),
        }];
        let req = request("", &headers);
        assert_eq!(req.header("Content-Type"), Some("text/plain"));
        assert_eq!(req.header("accept"), None);
    }
}
