#!/usr/bin/env python3
"""A signaling service written with grpcio, against a running Veil controller.

Builds its stubs from proto/veil/v1/*.proto with grpcio-tools (as a third party would), then:
checks grpc.health.v1, lists the services through server reflection with grpcio-reflection's
client (which speaks grpc.reflection.v1alpha only), allocates a session, reads it back, watches it from another thread,
releases it and sees the watch end with RELEASED, and checks that a bad request gets
INVALID_ARGUMENT with machine-readable details (google.rpc.Status in grpc-status-details-bin, its
ErrorInfo and BadRequest decoded from a minimal copy of google/rpc's messages, as a client without
googleapis-common-protos would). Prints a JSON summary; exit status 0 means every step succeeded.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import threading

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_tools import protoc


# The fields of google/rpc/status.proto and error_details.proto this client reads: wire-compatible
# with the originals.
GOOGLE_RPC = """
syntax = "proto3";
package google.rpc;
import "google/protobuf/any.proto";
message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
message BadRequest {
  message FieldViolation { string field = 1; string description = 2; string reason = 3; }
  repeated FieldViolation field_violations = 1;
}
"""


def build_stubs(proto_root: str, out: str):
    files = [os.path.join("veil", "v1", f) for f in ("session.proto", "registry.proto", "admin.proto")]
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed: {rc}")
    rpc_dir = os.path.join(out, "rpc_src")
    os.makedirs(os.path.join(rpc_dir, "google", "rpc"), exist_ok=True)
    with open(os.path.join(rpc_dir, "google", "rpc", "minimal.proto"), "w") as f:
        f.write(GOOGLE_RPC)
    rc = protoc.main(["protoc", f"-I{rpc_dir}", f"-I{include}", f"--python_out={out}",
                      os.path.join("google", "rpc", "minimal.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed on google.rpc: {rc}")
    sys.path.insert(0, out)
    return importlib.import_module("veil.v1.session_pb2"), importlib.import_module("veil.v1.session_pb2_grpc")


def error_details(e: grpc.RpcError, rpc_pb) -> dict:
    """ErrorInfo and BadRequest of a failed call, from its grpc-status-details-bin trailer."""
    raw = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        return {}
    status = rpc_pb.Status.FromString(raw)
    out = {"status_code": status.code, "status_message": status.message}
    for any_ in status.details:
        if any_.Is(rpc_pb.ErrorInfo.DESCRIPTOR):
            info = rpc_pb.ErrorInfo()
            any_.Unpack(info)
            out["reason"], out["domain"] = info.reason, info.domain
        elif any_.Is(rpc_pb.BadRequest.DESCRIPTOR):
            br = rpc_pb.BadRequest()
            any_.Unpack(br)
            out["fields"] = [(v.field, v.reason) for v in br.field_violations]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, help="host:port of the controller")
    p.add_argument("--proto", required=True, help="the proto/ directory")
    a = p.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory() as out:
        for d in ("veil", os.path.join("veil", "v1")):
            os.makedirs(os.path.join(out, d), exist_ok=True)
            open(os.path.join(out, d, "__init__.py"), "w").close()
        pb, rpc = build_stubs(a.proto, out)
        channel = grpc.insecure_channel(a.target)
        grpc.channel_ready_future(channel).result(timeout=10)

        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="veil.v1.SessionService"), timeout=5).status
        summary["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)

        # What a third party without the .proto files sees: the services, and the methods of
        # SessionService as the reflected descriptors describe them.
        reflected = ProtoReflectionDescriptorDatabase(channel)
        summary["reflection_services"] = sorted(reflected.get_services())
        pool = descriptor_pool.DescriptorPool(reflected)
        summary["reflection_session_methods"] = sorted(
            m.name for m in pool.FindServiceByName("veil.v1.SessionService").methods)

        api = rpc.SessionServiceStub(channel)
        req = pb.AllocateSessionRequest(
            call_id="grpcio-call",
            participants=[
                pb.Participant(participant_id="alice", preferred_transport=pb.TRANSPORT_QUIC),
                pb.Participant(participant_id="bob", region="eu-west"),
            ],
            ttl_seconds=600,
        )
        answer = api.AllocateSession(req, timeout=5)
        s = answer.session
        summary["created"] = answer.created
        summary["legs"] = len(s.legs)
        summary["token_len"] = len(s.legs[0].token)
        again = api.AllocateSession(req, timeout=5)
        summary["idempotent"] = (not again.created) and again.session == s
        got = api.GetSession(pb.GetSessionRequest(session_id=s.session_id), timeout=5).session
        # GetSession adds what each leg is doing (nobody bound yet): the rest is the allocation.
        summary["get_activity"] = all(
            leg.HasField("activity") and not leg.activity.bound for leg in got.legs
        )
        for leg in got.legs:
            leg.ClearField("activity")
        summary["get_matches"] = got == s and summary["get_activity"]

        events = []
        watch = api.WatchSession(pb.WatchSessionRequest(session_id=s.session_id), timeout=20)
        first = threading.Event()

        def read():
            for ev in watch:
                events.append(pb.SessionEvent.Kind.Name(ev.kind))
                first.set()

        t = threading.Thread(target=read)
        t.start()
        if not first.wait(10):
            raise RuntimeError("no SNAPSHOT from WatchSession")
        # A third participant joins, then leaves; the watch sees both changes.
        joined = api.AddParticipant(pb.AddParticipantRequest(
            session_id=s.session_id, participant=pb.Participant(participant_id="carol")), timeout=5)
        summary["added"] = [joined.created, joined.leg.leg_index, len(joined.session.legs)]
        left = api.RemoveParticipant(pb.RemoveParticipantRequest(
            session_id=s.session_id, participant_id="carol"), timeout=5).session
        summary["after_remove"] = [leg.participant_id for leg in left.legs]
        try:
            api.RemoveParticipant(pb.RemoveParticipantRequest(
                session_id=s.session_id, participant_id="nobody"), timeout=5)
            summary["unknown_participant"] = "accepted"
        except grpc.RpcError as e:
            summary["unknown_participant"] = [e.code().name, error_details(
                e, importlib.import_module("google.rpc.minimal_pb2")).get("reason")]
        # The call outlives its TTL: extended to 2 hours from now, past the 600 s it had.
        extended = api.ExtendSession(pb.ExtendSessionRequest(
            session_id=s.session_id, ttl_seconds=7200), timeout=5).session
        summary["extended_by_s"] = extended.expires_at.seconds - s.expires_at.seconds
        summary["extended_tokens_same"] = [l.token for l in extended.legs] == [l.token for l in s.legs]
        released = api.ReleaseSession(pb.ReleaseSessionRequest(session_id=s.session_id), timeout=5).session
        summary["released_state"] = pb.SessionState.Name(released.state)
        t.join(10)
        summary["watch"] = events

        try:
            api.AllocateSession(pb.AllocateSessionRequest(call_id="", participants=[]), timeout=5)
            summary["bad_request"] = "accepted"
        except grpc.RpcError as e:
            summary["bad_request"] = e.code().name
            summary["bad_request_message"] = e.details()
            summary["bad_request_details"] = error_details(
                e, importlib.import_module("google.rpc.minimal_pb2"))

    print(json.dumps(summary))
    ok = (
        summary["health"] == "SERVING"
        and summary["created"]
        and summary["legs"] == 2
        and summary["token_len"] == 64
        and summary["idempotent"]
        and summary["get_matches"]
        and summary["released_state"] == "SESSION_STATE_RELEASED"
        and summary["watch"] == ["KIND_SNAPSHOT", "KIND_PARTICIPANTS_CHANGED",
                                 "KIND_PARTICIPANTS_CHANGED", "KIND_EXTENDED", "KIND_RELEASED"]
        and 6600 <= summary["extended_by_s"] <= 6660
        and summary["extended_tokens_same"]
        and summary["added"] == [True, 2, 3]
        and summary["after_remove"] == ["alice", "bob"]
        and summary["unknown_participant"] == ["NOT_FOUND", "PARTICIPANT_NOT_FOUND"]
        and summary["bad_request"] == "INVALID_ARGUMENT"
        and summary["bad_request_details"].get("reason") == "INVALID_FIELD"
        and summary["bad_request_details"].get("domain") == "veil.v1"
        and summary["health"] == "SERVING"
        and "veil.v1.SessionService" in summary["reflection_services"]
        and "AllocateSession" in summary["reflection_session_methods"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
