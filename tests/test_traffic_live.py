"""Integration: pools and priorities through real sockets and real fake llama-servers."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from .integration import FAKE, LiveTestCase, Reply, StreamReader

POOLED = f"""
pools:
  tasks:
    models: [alpha, beta]
    priority: -1
    name: Task model
models:
  alpha:
    cmd: {FAKE} --parallel 1
  beta:
    cmd: {FAKE}
"""


class TrafficCase(LiveTestCase):
    """Helpers: a user's open stream, a request left running in the background."""

    async def hold_stream(self, model: str) -> StreamReader:
        """A user's streamed answer that goes on until the user hangs up."""
        document = {"model": model, "stream": True, "messages": [], "fake": {"hold": True}}
        _, reader = await self.stream(document)
        await reader.until(b"data:")
        return reader

    def send_later(self, model: str, **headers: str) -> Deferred[Reply]:
        body = json.dumps({"model": model, "messages": []}).encode()
        headers["content-type"] = "application/json"
        return Deferred.fromCoroutine(self.request("POST", "/v1/chat/completions", body, headers))


class PoolLiveTests(TrafficCase):
    async def test_the_pool_is_served_by_the_loaded_model_without_a_swap(self) -> None:
        await self.serve(POOLED)
        self.assertEqual((await self.chat("beta")).code, 200)
        reply = await self.chat("tasks")
        self.assertEqual(reply.code, 200)
        self.assertIn("model=beta", reply.json()["choices"][0]["message"]["content"])
        self.assertEqual(list(await self.running()), ["beta"])
        listed = {m["id"]: m for m in (await self.request("GET", "/v1/models")).json()["data"]}
        self.assertEqual(listed["tasks"]["name"], "Task model")
        self.assertEqual(listed["tasks"]["meta"]["llamaswap"]["serves"], "beta")

    async def test_a_pool_with_nothing_loaded_starts_its_first_model(self) -> None:
        await self.serve(POOLED)
        reply = await self.chat("tasks")
        self.assertIn("model=alpha", reply.json()["choices"][0]["message"]["content"])

    async def queued_on_alpha(self) -> bool:
        return bool((await self.running()).get("alpha", {}).get("queued") == 1)

    async def test_background_work_waits_for_the_users_slot(self) -> None:
        await self.serve(POOLED)
        await self.chat("alpha")
        user = await self.hold_stream("alpha")
        title = self.send_later("tasks")
        await self.eventually(self.queued_on_alpha, "the title request waits in llamaswap's queue")
        self.assertEqual((await self.running())["alpha"]["in_flight"], 1)
        user.hang_up()
        reply = await title
        self.assertEqual(reply.code, 200)
        self.assertIn("model=alpha", reply.json()["choices"][0]["message"]["content"])

    async def test_a_cold_model_answers_the_chat_before_the_title_sent_ahead_of_it(
        self,
    ) -> None:
        # Open WebUI sends the title just before the chat: the title starts alpha,
        # but the user's chat, queued behind it, gets alpha's one slot first
        await self.serve(POOLED.replace("--parallel 1", "--parallel 1 --load-time 0.5"))
        title = self.send_later("tasks")
        await self.eventually(self.queued_on_alpha, "the title waits for alpha to load")
        user = await self.hold_stream("alpha")
        entry = (await self.running())["alpha"]
        self.assertEqual((entry["in_flight"], entry["queued"]), (1, 1))
        self.assertNoResult(title)
        user.hang_up()
        reply = await title
        self.assertIn("model=alpha", reply.json()["choices"][0]["message"]["content"])

    async def test_x_priority_lowers_and_bad_values_are_400(self) -> None:
        await self.serve(POOLED)
        await self.chat("alpha")
        user = await self.hold_stream("alpha")
        bad = await self.send_later("alpha", **{"x-priority": "urgent"})
        self.assertEqual(bad.code, 400)
        self.assertEqual(bad.json()["error"]["code"], "invalid_priority")
        low = self.send_later("alpha", **{"x-priority": "low"})
        await self.eventually(self.queued_on_alpha, "the low-priority request waits for the slot")
        user.hang_up()
        self.assertEqual((await low).code, 200)


HELD = f"""
scheduler:
  maxWait: 60
  hold: 30
models:
  alpha:
    cmd: {FAKE}
  beta:
    cmd: {FAKE}
"""


class HoldLiveTests(TrafficCase):
    async def test_the_next_step_keeps_the_model_while_another_request_waits(self) -> None:
        await self.serve(HELD)  # the default policy (collate), with a long hold
        self.assertEqual((await self.chat("alpha")).code, 200)
        other = self.send_later("beta")

        await self.eventually(
            lambda: succeed(self.api.scheduler.queued("beta") == 1), "beta's request is queued"
        )
        step = await self.chat("alpha")  # the agent's next step: same model, no swap
        self.assertIn("model=alpha", step.json()["choices"][0]["message"]["content"])
        self.assertEqual(list(await self.running()), ["alpha"])
        self.assertEqual(self.api.scheduler.queued("beta"), 1)
        other.addErrback(lambda _: None)
        other.cancel()  # the client gives up; nothing is left waiting
        await self.eventually(
            lambda: succeed(self.api.scheduler.queued() == 0), "the queue is empty"
        )


LISTED = f"""
includeAliasesInList: true
profiles:
  pair: [chat, embed]
peers:
  box:
    proxy: http://127.0.0.1:9
    models: [chat]
models:
  chat:
    cmd: {FAKE}
    name: Chat
    aliases: [talk]
  other:
    cmd: {FAKE}
    name: Chat
  embed:
    cmd: {FAKE} --embedding
"""


class ModelListTests(LiveTestCase):
    async def test_every_entry_has_its_own_name_and_a_capability(self) -> None:
        await self.serve(LISTED)
        data = (await self.request("GET", "/v1/models")).json()["data"]
        names = [m["name"] for m in data]
        self.assertEqual(len(names), len(set(names)), names)
        by_id = {m["id"]: m for m in data}
        self.assertEqual(by_id["pair:chat"]["name"], "Chat (pair)")
        self.assertEqual(by_id["embed"]["capabilities"], ["embeddings"])
        self.assertEqual(by_id["pair:embed"]["capabilities"], ["embeddings"])
        self.assertEqual(by_id["chat"]["capabilities"], ["chat"])
        self.assertEqual(by_id["box/chat"]["name"], "chat (box)")


# maxWait far beyond any load time here, even on a busy machine: only patience can
# doom alpha within the test's wait
CHEAP = f"""
scheduler:
  hold: 0
  maxWait: 600
models:
  alpha:
    cmd: {FAKE} --load-time 0.3
  beta:
    cmd: {FAKE} --load-time 0.3
"""


class PatienceLiveTests(TrafficCase):
    async def test_a_cheap_swap_waits_a_few_load_times_not_max_wait(self) -> None:
        await self.serve(CHEAP)  # the default patience: 6 load times, about 2 s here
        await self.chat("alpha")
        user = await self.hold_stream("alpha")  # alpha stays busy
        other = self.send_later("beta")
        await self.eventually(
            lambda: succeed(self.api.scheduler.queued("beta") == 1), "beta's request is queued"
        )
        # once beta has waited its patience, alpha is doomed: new requests queue
        late: list[Deferred[Reply]] = []

        async def alpha_is_doomed() -> bool:
            late.append(self.send_later("alpha"))
            await deferLater(reactor, 0.1)
            return self.api.scheduler.queued("alpha") > 0

        # bounded by the number of checks, not by the patience (a busy machine's
        # load time sets that): patience dooms alpha long before maxWait would
        await self.eventually(alpha_is_doomed, "a new request for alpha waits", tries=300)
        user.hang_up()  # alpha drains: beta loads, then alpha again for the late ones
        self.assertEqual((await other).code, 200)
        for reply in late:
            self.assertEqual((await reply).code, 200)


PATIENT = f"""
scheduler:
  hold: 30
  patience: 0
  maxWait: 60
models:
  alpha:
    cmd: {FAKE}
  beta:
    cmd: {FAKE}
"""


class MovedOnLiveTests(TrafficCase):
    """The hold after a request keeps the model for its client's next step, never
    against that client: a keep-alive client that moves on swaps at once."""

    async def test_a_keep_alive_client_that_moves_on_is_not_held_back(self) -> None:
        await self.serve(PATIENT)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1  # one client, one connection, as an SDK keeps
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        self.assertEqual((await self.chat("alpha")).code, 200)
        # held 30 s against anyone else: a deadline of 5 s would end in 504
        reply = await self.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"model": "beta", "messages": []}).encode(),
            {"content-type": "application/json", "x-request-deadline": "5"},
        )
        self.assertEqual(reply.code, 200)

    async def test_another_connection_waits_for_the_hold(self) -> None:
        await self.serve(PATIENT)
        self.assertEqual((await self.chat("alpha")).code, 200)  # a connection of its own
        reply = await self.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"model": "beta", "messages": []}).encode(),
            {"content-type": "application/json", "x-request-deadline": "2"},
        )
        self.assertEqual(reply.code, 504)  # alpha is held for its client's next step
