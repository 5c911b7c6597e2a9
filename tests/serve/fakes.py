"""Stand-ins for Serve deployment handles, so the ingress can be tested without Ray.

`FakeHandle(obj)` mimics a DeploymentHandle of a deployment whose code is `obj`:
`handle.method.remote(*args)` returns an awaitable with `cancel()` (a DeploymentResponse), and
`handle.options(stream=True).method.remote(*args)` an async iterator with `cancel()`.
"""

from __future__ import annotations

import asyncio
import inspect


class FakeResponse:
    def __init__(self, fn, args):
        async def run():
            out = fn(*args)
            return await out if inspect.isawaitable(out) else out

        self.task = asyncio.ensure_future(run())
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        self.cancelled = True
        self.task.cancel()


class FakeStream:
    def __init__(self, agen):
        self.agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    def __init__(self, obj, stream: bool = False):
        self._obj, self._streaming = obj, stream
        self._sent: list[FakeResponse | FakeStream] = []

    @property
    def sent(self) -> list:
        return self._sent

    def options(self, stream: bool = False) -> "FakeHandle":
        other = FakeHandle(self._obj, stream)
        other._sent = self._sent  # one log of calls per deployment
        return other

    def __getattr__(self, name):
        fn = getattr(self._obj, name)
        handle = self

        class Method:
            @staticmethod
            def remote(*args):
                sent = FakeStream(fn(*args)) if handle._streaming else FakeResponse(fn, args)
                handle._sent.append(sent)
                return sent

        return Method
