"""A global rate limit service for the end-to-end tests: a real gRPC server speaking Envoy's
`envoy.service.ratelimit.v3.RateLimitService` (the protocol envoyproxy/ratelimit serves), with
the generated `xds-protos` messages. It records every request it gets and answers what the test
says: `OK`, or `OVER_LIMIT` for the descriptors the test marks as over their limit.
"""
import threading
from concurrent import futures

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.duration_pb2 import Duration


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, port, reset_seconds=42):
        self.port = port
        self.reset_seconds = reset_seconds
        self.requests = []  # (domain, [[(key, value), ...] per descriptor], hits_addend)
        self.over_limit = set()  # descriptors, as tuples of (key, value), answered OVER_LIMIT
        self._lock = threading.Lock()
        self._server = None

    def ShouldRateLimit(self, request, context):
        descriptors = [tuple((e.key, e.value) for e in d.entries) for d in request.descriptors]
        with self._lock:
            self.requests.append((request.domain, descriptors, request.hits_addend))
            over = set(descriptors) & self.over_limit
        statuses = []
        for descriptor in descriptors:
            status = rls_pb2.RateLimitResponse.DescriptorStatus(
                code=rls_pb2.RateLimitResponse.OVER_LIMIT if descriptor in over
                else rls_pb2.RateLimitResponse.OK,
                current_limit=rls_pb2.RateLimitResponse.RateLimit(
                    requests_per_unit=100, unit=rls_pb2.RateLimitResponse.RateLimit.MINUTE),
                limit_remaining=0 if descriptor in over else 99,
                duration_until_reset=Duration(seconds=self.reset_seconds),
            )
            statuses.append(status)
        overall = rls_pb2.RateLimitResponse.OVER_LIMIT if over else rls_pb2.RateLimitResponse.OK
        return rls_pb2.RateLimitResponse(overall_code=overall, statuses=statuses)

    def taken(self):
        """The requests received since the last call, oldest first."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def start(self):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self, self._server)
        if self._server.add_insecure_port(f"127.0.0.1:{self.port}") == 0:
            raise RuntimeError(f"rate limit service could not bind port {self.port}")
        self._server.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.stop(grace=None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
