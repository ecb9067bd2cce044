//! One handler call across the ABI, as a worker makes it: borrow hyper's
//! request, call the library, check the answer and turn it into hyper's
//! response. Public (through the `host` library) for the ABI benchmark.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use abi_stable::std_types::{RCow, RCowStr};
use bytes::Bytes;
use handler_api::{HandlerModuleRef, Header, Request, ResponseHeader};
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderName, HeaderValue, InvalidHeaderValue, CONTENT_TYPE};
use hyper::StatusCode;
use smallvec::SmallVec;

/// The responses workers send.
pub type HttpResponse = hyper::Response<Body>;

/// The most body bytes handed to hyper at once.
///
/// Workers have hyper flatten each response into its connection's write
/// buffer (`http1::Builder::writev(false)`): a small answer then leaves in
/// one `send` of one contiguous buffer, which costs less, in user space
/// and in the kernel, than hyper's queue of buffers and a two-part
/// `writev`. hyper copies every body frame into that buffer whole and keeps
/// its capacity for the connection's life, so a large body goes in pieces:
/// the buffer stays under `max_buf_size` plus one piece.
pub const BODY_PIECE: usize = 16 << 10;

/// A response body known in full, given to hyper in pieces of at most
/// [`BODY_PIECE`] bytes (one frame for a small body, like `Full`).
#[derive(Debug, Default)]
pub struct Body {
    rest: Bytes,
}

impl Body {
    /// A body of these bytes.
    pub fn new(bytes: Bytes) -> Body {
        Body { rest: bytes }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let piece = if self.rest.len() <= BODY_PIECE {
            std::mem::take(&mut self.rest)
        } else {
            self.rest.split_to(BODY_PIECE)
        };
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A `text/plain` response with a fixed body, for the host's own answers.
pub fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = hyper::Response::new(Body::new(Bytes::from_static(body.as_bytes())));
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
    let mut response = hyper::Response::new(Body::new(Bytes::from_owner(body)));
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
    use http_body_util::BodyExt as _;
    use hyper::body::Body as _;

    #[test]
    fn a_body_comes_whole_or_in_pieces_of_body_piece() {
        let frames = |len: usize| {
            let body = Body::new(Bytes::from(vec![7u8; len]));
            assert_eq!(body.size_hint().exact(), Some(len as u64));
            assert_eq!(body.is_end_stream(), len == 0);
            let collected = data_frames(body);
            assert_eq!(collected.iter().map(Bytes::len).sum::<usize>(), len);
            collected.iter().map(Bytes::len).collect::<Vec<_>>()
        };
        assert_eq!(frames(0), Vec::<usize>::new());
        assert_eq!(frames(31), [31]);
        assert_eq!(frames(BODY_PIECE), [BODY_PIECE]);
        assert_eq!(frames(2 * BODY_PIECE + 5), [BODY_PIECE, BODY_PIECE, 5]);
    }

    /// Every data frame of `body`, polled to the end.
    fn data_frames(mut body: Body) -> Vec<Bytes> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                frames.push(frame.unwrap().into_data().unwrap());
            }
            frames
        })
    }

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
