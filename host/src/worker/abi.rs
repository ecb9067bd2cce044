//! One handler call across the ABI, as a worker makes it: borrow hyper's
//! request, call the library, check the answer and turn it into hyper's
//! response. Public (through the `host` library) for the ABI benchmark.

use abi_stable::std_types::{RCow, RCowStr};
use bytes::Bytes;
use handler_api::{HandlerModuleRef, Header, Request, ResponseHeader};
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, InvalidHeaderValue, CONTENT_TYPE};
use hyper::StatusCode;
use smallvec::SmallVec;

/// The responses workers send.
pub type HttpResponse = hyper::Response<Full<Bytes>>;

/// A `text/plain` response with a fixed body, for the host's own answers.
pub fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(handler_api::TEXT_PLAIN),
    );
    response
}

/// One call across the ABI: borrow the request, take ownership of the answer.
pub fn call_handler(
    handler: HandlerModuleRef,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    peer: &str,
) -> HttpResponse {
    // On the stack for up to 16 headers; filled in place (a `collect` would
    // move the whole array).
    let mut headers = SmallVec::<[Header<'_>; 16]>::new();
    headers.extend(parts.headers.iter().map(|(name, value)| Header {
        name: name.as_str().into(),
        value: value.as_bytes().into(),
    }));
    let request = Request {
        method: parts.method.as_str().into(),
        path: parts.uri.path().into(),
        query: parts.uri.query().unwrap_or("").into(),
        headers: headers.as_slice().into(),
        body: body.as_ref().into(),
        peer: peer.into(),
    };
    let answer = (handler.handle())(&request);
    into_http(answer)
}

/// Checks the handler's answer and turns it into hyper's response: headers
/// the handler gave as `&'static str` are referenced, not copied.
pub fn into_http(answer: handler_api::Response) -> HttpResponse {
    let handler_api::Response {
        status,
        content_type,
        headers,
        body,
    } = answer;
    let Ok(status) = StatusCode::from_u16(status) else {
        tracing::warn!(status, "handler returned an invalid status");
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "handler returned an invalid status\n",
        );
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from_owner(body)));
    *response.status_mut() = status;
    let map = response.headers_mut();
    if !content_type.is_empty() {
        match header_value(content_type) {
            Ok(value) => {
                map.insert(CONTENT_TYPE, value);
            }
            Err(_) => tracing::warn!("handler returned an invalid content type; dropped"),
        }
    }
    for ResponseHeader { name, value } in headers {
        match (HeaderName::from_bytes(name.as_bytes()), header_value(value)) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            _ => tracing::warn!(header = %name, "handler returned an invalid header; dropped"),
        }
    }
    response
}

fn header_value(value: RCowStr<'static>) -> Result<HeaderValue, InvalidHeaderValue> {
    match value {
        // The library is never unloaded while the worker runs: its statics
        // really are 'static.
        RCow::Borrowed(s) => {
            HeaderValue::from_maybe_shared(Bytes::from_static(s.as_str().as_bytes()))
        }
        RCow::Owned(s) => HeaderValue::from_str(&s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_headers_are_dropped_and_invalid_statuses_refused() {
        let answer = handler_api::Response::text(201, "made")
            .with_header("x-fine", "yes")
            .with_header("bad name", "x")
            .with_header("x-bad-value", "a\nb")
            .with_header(String::from("x-owned"), String::from("kept"));
        let response = into_http(answer);
        assert_eq!(response.status(), StatusCode::CREATED);
        let names: Vec<&str> = response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-fine", "x-owned"]);
        assert_eq!(response.headers()["x-owned"], "kept");
        let bad_type = handler_api::Response::new(200, "").with_content_type("text/\r\nplain");
        assert!(into_http(bad_type).headers().is_empty());
        let bad_status = handler_api::Response::new(42, "");
        assert_eq!(
            into_http(bad_status).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
