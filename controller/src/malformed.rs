//! Malformed and oversized requests answered with the codes a client can act on.
//!
//! tonic answers a request it cannot decode with `INTERNAL` (its protobuf codec follows the
//! letter of grpc's status-code table, which is about a server's own serialization failures) and
//! a message over the server's `max_decoding_message_size` with `OUT_OF_RANGE`. Both say "retry
//! may help" or "server bug" where the client's request is at fault. This layer rewrites exactly
//! those answers, and nothing else:
//!
//! | tonic answers | for | becomes |
//! |---|---|---|
//! | `INTERNAL` "failed to decode Protobuf message: ..." | invalid UTF-8, wrong wire type, truncated field, invalid tag or varint, nesting past prost's recursion limit | `INVALID_ARGUMENT`, `MALFORMED_REQUEST`, with a `BadRequest` naming the field where prost names one |
//! | `INTERNAL` "Unexpected EOF decoding stream." | the request body ended inside a gRPC message | `INVALID_ARGUMENT`, `MALFORMED_REQUEST` |
//! | `INTERNAL` "Missing request message." | a unary request with no message at all | `INVALID_ARGUMENT`, `MALFORMED_REQUEST` |
//! | `INTERNAL` "protocol error: received message with invalid compression flag: ..." | a frame flag other than 0 or 1 | `INVALID_ARGUMENT`, `MALFORMED_REQUEST` |
//! | `OUT_OF_RANGE` "Error, decoded message length too large: ..." | a message over [`crate::MAX_MESSAGE_BYTES`] | `RESOURCE_EXHAUSTED`, `REQUEST_TOO_LARGE`, metadata `size_bytes` and `limit_bytes` |
//!
//! A message with the compressed flag set and no `grpc-encoding` keeps `INTERNAL`: the gRPC
//! compression spec requires it.
//!
//! The answers are recognised by code and tonic's own message (they carry no other mark), and
//! only when they carry no details, which every status the controller makes itself does: a
//! handler's status is never mistaken for one. `controller/tests/errors.rs` sends each case over
//! raw HTTP/2 to every service, so a tonic upgrade that rewords one fails there.
//!
//! The status travels in the response headers when a call fails before any message (every
//! unary and server-streaming method, and `Attach`'s first message), and in the trailers when a
//! later message of a request stream fails (`Attach`'s load reports): both are rewritten.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::{Code, Status};
use tonic_types::{BadRequest, FieldViolation};

use crate::errors::{self, Reason, Violation};

/// How prost's `DecodeError` displays itself; the location stack and the description follow.
const PROST_PREFIX: &str = "failed to decode Protobuf message: ";
const TONIC_EOF: &str = "Unexpected EOF decoding stream.";
const TONIC_MISSING: &str = "Missing request message.";
const TONIC_BAD_FLAG: &str = "protocol error: received message with invalid compression flag";
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// The status a client should get instead of `status`, if `status` is one of tonic's answers to
/// a malformed or oversized request (see the module's table).
pub fn rewrite(status: &Status) -> Option<Status> {
    if !status.details().is_empty() {
        return None;
    }
    let msg = status.message();
    match status.code() {
        Code::Internal => {
            if let Some(rest) = msg.strip_prefix(PROST_PREFIX) {
                Some(undecodable(msg, rest))
            } else if msg == TONIC_EOF {
                Some(malformed(
                    "truncated request: the request stream ended inside a message",
                ))
            } else if msg == TONIC_MISSING {
                Some(malformed("the request carries no message"))
            } else if msg.starts_with(TONIC_BAD_FLAG) {
                Some(malformed(msg.to_string()))
            } else {
                None
            }
        }
        Code::OutOfRange => {
            // "...found {size} bytes, the limit is: {limit} bytes"
            let rest = msg.strip_prefix(TONIC_TOO_LARGE)?;
            let (size, rest) = rest.split_once(" bytes, the limit is: ")?;
            let limit = rest.strip_suffix(" bytes")?;
            let (size, limit): (u64, u64) = (size.parse().ok()?, limit.parse().ok()?);
            Some(errors::status(
                Code::ResourceExhausted,
                format!("request message too large: {size} bytes, the limit is {limit} bytes"),
                Reason::RequestTooLarge,
                &[
                    ("size_bytes", size.to_string()),
                    ("limit_bytes", limit.to_string()),
                ],
                Vec::new(),
            ))
        }
        _ => None,
    }
}

fn malformed(message: impl Into<String>) -> Status {
    errors::simple(Code::InvalidArgument, message, Reason::MalformedRequest)
}

/// A prost decode error: `rest` is its location stack (`Message.field: `, innermost first) and
/// description. The field path is the stack's field names, outermost first.
fn undecodable(message: &str, rest: &str) -> Status {
    let mut fields = Vec::new();
    let mut description = rest;
    while let Some((head, tail)) = description.split_once(": ") {
        let Some((ty, field)) = head.split_once('.') else {
            break;
        };
        let ident =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ident(ty) || !ident(field) {
            break;
        }
        fields.push(field);
        description = tail;
    }
    fields.reverse();
    let field = fields.join(".");
    let mut metadata = Vec::new();
    let mut more = Vec::new();
    if !field.is_empty() {
        let mut v = FieldViolation::new(field.clone(), description.to_string());
        v.reason = Violation::Undecodable.as_str().to_string();
        more.push(BadRequest::new(vec![v]).into());
        metadata.push(("field", field));
    }
    errors::status(
        Code::InvalidArgument,
        message,
        Reason::MalformedRequest,
        &metadata,
        more,
    )
}

/// Rewrites the status in `headers` (a trailers-only answer, or trailers) if [`rewrite`] says
/// so. Returns the new status.
fn rewrite_headers(headers: &mut http::HeaderMap) -> Option<Status> {
    let code = Code::from_bytes(headers.get(Status::GRPC_STATUS)?.as_bytes());
    // Only the two codes tonic uses, and only without details (which `from_header_map` would
    // decode, panicking on bad base64).
    if !matches!(code, Code::Internal | Code::OutOfRange)
        || headers.contains_key(Status::GRPC_STATUS_DETAILS)
    {
        return None;
    }
    let new = rewrite(&Status::from_header_map(headers)?)?;
    headers.remove(Status::GRPC_MESSAGE);
    // Fails only for a message that is no valid header value: ours are plain ASCII.
    new.add_header(headers).ok()?;
    Some(new)
}

/// Adds [`Malformed`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct MalformedLayer;

impl<S> tower::Layer<S> for MalformedLayer {
    type Service = Malformed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Malformed { inner }
    }
}

/// Rewrites tonic's answers to malformed and oversized requests (see the module).
#[derive(Debug, Clone)]
pub struct Malformed<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Malformed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<Rewritten<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let (mut parts, body) = fut.await?.into_parts();
            if let Some(status) = rewrite_headers(&mut parts.headers) {
                // tonic keeps the status it answered with here too; keep the two in step.
                if parts.extensions.get::<Status>().is_some() {
                    parts.extensions.insert(status);
                }
            }
            Ok(http::Response::from_parts(parts, Rewritten { inner: body }))
        })
    }
}

/// A response body whose trailers pass through [`rewrite`].
#[derive(Debug)]
pub struct Rewritten<B> {
    inner: B,
}

impl<B> Body for Rewritten<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            rewrite_headers(trailers);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn reason(s: &Status) -> String {
        s.get_error_details().error_info().unwrap().reason.clone()
    }

    #[test]
    fn prost_errors_become_invalid_argument_naming_the_field() {
        let tonic = Status::internal(
            "failed to decode Protobuf message: Participant.participant_id: \
             AllocateSessionRequest.participants: invalid string value: data is not UTF-8 encoded",
        );
        let s = rewrite(&tonic).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), tonic.message(), "the precise message is kept");
        assert_eq!(reason(&s), "MALFORMED_REQUEST");
        let d = s.get_error_details();
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(v.field, "participants.participant_id");
        assert_eq!(
            v.description,
            "invalid string value: data is not UTF-8 encoded"
        );
        assert_eq!(v.reason, "UNDECODABLE");

        // No location: no BadRequest. A description with ": " in it is not a location.
        for msg in [
            "failed to decode Protobuf message: recursion limit reached",
            "failed to decode Protobuf message: invalid wire type: Varint (expected LengthDelimited)",
        ] {
            let s = rewrite(&Status::internal(msg)).unwrap();
            assert_eq!(s.code(), Code::InvalidArgument);
            assert!(s.get_error_details().bad_request().is_none(), "{msg}");
        }
    }

    #[test]
    fn oversized_becomes_resource_exhausted() {
        let s = rewrite(&Status::out_of_range(
            "Error, decoded message length too large: found 100013 bytes, the limit is: 65536 bytes",
        ))
        .unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "request message too large: 100013 bytes, the limit is 65536 bytes"
        );
        let d = s.get_error_details();
        let info = d.error_info().unwrap();
        assert_eq!(info.reason, "REQUEST_TOO_LARGE");
        assert_eq!(info.metadata["limit_bytes"], "65536");
        assert_eq!(info.metadata["size_bytes"], "100013");
    }

    #[test]
    fn everything_else_is_left_alone() {
        for s in [
            Status::internal("fresh link queue full"),
            Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ),
            Status::out_of_range("something else"),
            Status::invalid_argument("failed to decode Protobuf message: x"),
            // Already carrying details: the controller's own.
            errors::simple(
                Code::Internal,
                "failed to decode Protobuf message: x",
                Reason::MalformedRequest,
            ),
        ] {
            assert!(rewrite(&s).is_none(), "{s:?}");
        }
    }

    #[test]
    fn headers_are_rewritten_in_place() {
        let mut h = http::HeaderMap::new();
        Status::internal(TONIC_EOF).add_header(&mut h).unwrap();
        h.insert("other", http::HeaderValue::from_static("kept"));
        let s = rewrite_headers(&mut h).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        let back = Status::from_header_map(&h).unwrap();
        assert_eq!(back.code(), Code::InvalidArgument);
        assert_eq!(reason(&back), "MALFORMED_REQUEST");
        assert_eq!(h["other"], "kept");
        // A second pass changes nothing: the answer now carries details.
        assert!(rewrite_headers(&mut h).is_none());
    }
}
