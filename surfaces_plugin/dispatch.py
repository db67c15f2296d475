"""Routing of plain messages to agents: per-room FIFO, catch-up order, cancel and retry.

Each room has one worker draining its queue, so a room answers one message at a time and in
order, while different rooms run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import replace

from mautrix.types import EventID, MessageEvent

from . import layout, replies
from .access import AccessService
from .backends import (
    Backend,
    BackendError,
    BackendRegistry,
    ChatMessage,
    ErrorKind,
    GenerationRequest,
    Usage,
)
from .catchup import INTERRUPTED_MARK, TOOLS_INTERRUPTED, CatchUp
from .config import AgentSpec, Settings
from .context_builder import ContextBuilder
from .context_window import Window
from .history import History
from .jobs import Job
from .matrix import MatrixIO
from .rooms import RoomDirectory, WorkingRoom
from .streaming import CANCELLED_MARK, StreamedReply, Typing
from .tool_runs import Outcome, ToolNotice, ToolSource, marker_for, without_tool_messages
from .txn import content_label

CaughtUp = Callable[[int, int, float], None]  # (messages, rooms, seconds) once catch-up is done
# What an answer shows once its question is redacted: none of the text it had streamed.
REDACTED_TEXT = "*(cancelled: your message was deleted)*"
# A redaction matters while its message waits in a queue, so the recent ones are enough.
RECENT_REDACTIONS = 1024
# A turn that failed on our side (the store, Matrix): said in the room, explained in the log.
TURN_FAILED = (
    "Sorry, answering that message failed because of an error on my side. "
    "The operator can find the details in the bot's log."
)


class RateLimiter:
    """A sliding one-minute window per user; a refused user is told once per window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # seconds; tests pass their own to cross a window without waiting
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._told: set[str] = set()  # users refused since their last admitted message

    def allow(self, user_id: str, per_minute: int) -> bool:
        now = self.clock()
        hits = self._hits[user_id]
        while hits and now - hits[0] >= 60:
            hits.popleft()
        if len(hits) >= per_minute:
            return False
        hits.append(now)
        self._told.discard(user_id)  # the window has room again: a new refusal is news
        return True

    def first_refusal(self, user_id: str) -> bool:
        """True once per window: for the first refused message since the last admitted one."""
        if user_id in self._told:
            return False
        self._told.add(user_id)
        return True


class RecentRedactions:
    """(room, event) pairs redacted lately; past `limit`, the oldest are forgotten."""

    def __init__(self, limit: int = RECENT_REDACTIONS) -> None:
        self._limit = limit
        self._pairs: dict[tuple[str, str], None] = {}  # a dict keeps insertion order

    def add(self, room_id: str, event_id: str) -> None:
        self._pairs[(room_id, event_id)] = None
        if len(self._pairs) > self._limit:
            del self._pairs[next(iter(self._pairs))]

    def covers(self, job: Job) -> bool:
        return (job.room_id, job.event_id) in self._pairs


class Dispatcher:
    def __init__(
        self,
        io: MatrixIO,
        rooms: RoomDirectory,
        history: History,
        context: ContextBuilder,
        access: AccessService,
        backends: BackendRegistry,
        catch_up: CatchUp,
        settings: Callable[[], Settings],
        log: logging.Logger,
        on_caught_up: CaughtUp,
        tools: ToolSource | None = None,
    ) -> None:
        self.io = io
        self.rooms = rooms
        self.history = history
        self.context = context
        self.access = access
        self.backends = backends
        self.catch_up = catch_up
        self.settings = settings
        self.log = log
        self.on_caught_up = on_caught_up
        self.tools = tools  # the agents' MCP tools: offered to the model, run for its calls
        self._queues: dict[str, deque[Job]] = defaultdict(deque)
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._generating: dict[str, asyncio.Task[None]] = {}
        self._answering: dict[str, str] = {}  # room → the event id its generation answers
        self._cancelled_by: dict[str, str] = {}  # room → the `!ai cancel` stopping its answer
        self._redacted = RecentRedactions()
        self._forgetting: dict[str, set[asyncio.Task[None]]] = defaultdict(set)
        self._told_once: set[tuple[str, str]] = set()
        self._seen: set[str] = set()  # event ids queued or answered in this process
        # Rooms still reading back what was missed: their live messages wait here, in order.
        self._held: dict[str, list[Job]] = {}
        self._stopping = False
        self.limiter = RateLimiter()

    # intake (synchronous: keeps arrival order)

    def submit(self, evt: MessageEvent) -> None:
        room = self.rooms.room(evt.room_id)
        if room is None:
            return
        if evt.sender != room.owner:
            self._tell_not_owner_once(room, evt.sender)
            return
        self.enqueue(
            Job(
                room_id=evt.room_id,
                event_id=evt.event_id,
                sender=evt.sender,
                body=evt.content.body,  # a string: the app routes only text bodies here
                ts=evt.timestamp,
            )
        )

    def enqueue(self, job: Job) -> None:
        held = self._held.get(job.room_id)
        if held is not None:
            held.append(job)
            return
        if not job.retry:
            if job.event_id in self._seen:
                return
            self._seen.add(job.event_id)
        self._queues[job.room_id].append(job)
        if job.room_id not in self._workers:
            self._workers[job.room_id] = self.io.spawn(
                self._drain(job.room_id), name=f"room worker {job.room_id}"
            )

    def _tell_not_owner_once(self, room: WorkingRoom, user_id: str) -> None:
        self._notice_once(
            room,
            f"not owner {user_id}",
            f"{user_id}: this room is {room.owner}'s conversation with `{room.agent}`; "
            "only they can talk to the agent here.",
        )

    def _refuse_once(self, room: WorkingRoom, user_id: str) -> None:
        self._notice_once(
            room, f"refused {user_id}", "Sorry, you may no longer use this bot; ask an admin."
        )

    def _notice_once(self, room: WorkingRoom, reason: str, text: str) -> None:
        """A notice sent at most once per room and reason in this process (no chat flooding)."""
        key = (room.room_id, reason)
        if key in self._told_once:
            return
        self._told_once.add(key)
        self.io.spawn(self.io.send_notice(room.room_id, text), name=reason)

    async def _drain(self, room_id: str) -> None:
        queue = self._queues[room_id]
        try:
            while queue:
                job = queue.popleft()
                try:
                    await self._answer(job)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.log.exception("Answering %s in %s failed", job.event_id, room_id)
                    await self._say_turn_failed(room_id, job)
        finally:
            self._workers.pop(room_id, None)

    async def _say_turn_failed(self, room_id: str, job: Job) -> None:
        """The turn ends visibly, never in silence; if even that fails, the log says so."""
        try:
            await self.io.send_notice(room_id, TURN_FAILED, txn=job.txn("turn failed"))
        except Exception as e:
            self.log.warning("Could not tell %s that its turn failed: %s", room_id, e)

    # the answer

    async def _answer(self, job: Job) -> None:
        room = self.rooms.room(job.room_id)
        if room is None:
            return
        if self._redacted.covers(job):  # retracted while it waited: never sent, never stored
            await self.history.mark_processed(room, job.event_id, job.ts)
            return
        if not job.retry and not await self._admit(room, job):
            return
        # Redactions seen before this message are applied before its request is built.
        pending = self._forgetting.get(room.room_id)
        if pending:
            await asyncio.wait(set(pending))
        if self._redacted.covers(job):  # retracted while it was being stored
            await self.history.forget_user_turn(room, job.event_id)
            await self.history.mark_processed(room, job.event_id, job.ts)
            return
        task = asyncio.current_task()
        assert task is not None
        generation = asyncio.ensure_future(self._generate(room, job))
        self._generating[room.room_id] = generation
        self._answering[room.room_id] = job.event_id
        try:
            await generation
        except asyncio.CancelledError:
            if task.cancelling():
                raise  # the worker itself is being stopped
        finally:
            self._generating.pop(room.room_id, None)
            self._answering.pop(room.room_id, None)

    async def _admit(self, room: WorkingRoom, job: Job) -> bool:
        """Store a new message as a turn, or say why it is not answered (then it is processed)."""
        if await self.history.is_answered(room, job.event_id, job.ts):
            return False
        limits = self.settings().limits
        refusal = None
        if not self.access.has_access(job.sender):  # blocked (or no longer allowed) since
            self._refuse_once(room, job.sender)
        elif len(job.body) > limits.max_message_chars:
            refusal = (
                f"That message has {len(job.body)} characters; the limit is "
                f"{limits.max_message_chars}. Send a shorter one."
            )
        elif not self.limiter.allow(job.sender, limits.per_user_requests_per_minute):
            if self.limiter.first_refusal(job.sender):  # one notice, not one per message
                refusal = (
                    f"You are sending messages faster than the limit "
                    f"({limits.per_user_requests_per_minute} a minute), so I am not answering "
                    "them for now. Wait a little, then send again what you need answered."
                )
        else:
            await self.history.add_user_turn(room, job.event_id, job.sender, job.body, job.ts)
            return True
        if refusal is not None:
            await self.io.send_notice(room.room_id, refusal, txn=job.txn("refusal"))
        await self.history.mark_processed(room, job.event_id, job.ts)
        return False

    async def _generate(self, room: WorkingRoom, job: Job) -> None:
        settings = self.settings()
        agent = self.context.agent_of(room)
        backend = self.backends.for_agent(agent)
        answers = job.event_id or None
        marker = layout.TurnMarker(
            room.platform_chat_id, agent.id, answers=answers, command=job.attempt or None
        )
        stream = StreamedReply(
            self.io,
            self.settings,
            room.room_id,
            marker,
            job.txn,
            streaming=room.streams(settings.streaming.enabled),
        )
        notice = ToolNotice(
            self.io, room.room_id, marker_for(room.platform_chat_id, agent.id, answers), job.txn
        )
        typing = Typing(self.io, room.room_id, self.log)
        usage = None
        try:
            window = await self._window_within_budget(room, agent, job)
            chat_id = self.rooms.current(room).platform_chat_id  # compaction may have renewed it
            stream.turn = replace(marker, platform_chat_id=chat_id)
            notice.marker = marker_for(chat_id, agent.id, answers)
            request = await self._request(agent, backend, window, room)
            usage = await self._run_turn(agent, backend, request, stream, notice)
            await typing.stop()  # the agent is done: no typing notice while the answer is sent
            await stream.finish()
            await notice.end()
        except asyncio.CancelledError:
            # `!ai cancel`, a redaction, or the plugin stopping: say which in the answer itself.
            cancelled_by = self._cancelled_by.pop(room.room_id, None)
            if cancelled_by:  # the ending names the `!ai cancel` it carries out
                stream.turn = replace(stream.turn, command=cancelled_by)
            if self._redacted.covers(job):  # an answer to a retracted message is not kept
                await asyncio.shield(self._withdraw(stream))
                await self.history.mark_processed(room, job.event_id, job.ts)
                raise
            mark = (
                INTERRUPTED_MARK.format(prefix=settings.command_prefix)
                if self._stopping
                else CANCELLED_MARK
            )
            await asyncio.shield(stream.cancelled(mark))
            ended = TOOLS_INTERRUPTED.format(prefix=settings.command_prefix)
            await asyncio.shield(
                self._end_tools(room, notice, ended if self._stopping else "cancelled")
            )
            answer_id = stream.first_event_id
            if answer_id:
                await self.history.add_answer(room, stream.full_text, answer_id, None)
            # Unanswered at a stop: caught up later, unless tools ran (they must not run twice).
            if answer_id or notice.event_id or not self._stopping:
                await self.history.mark_processed(room, job.event_id, job.ts)
            raise
        except BackendError as e:
            # Once nothing was shown (no text, no tool call): answered again in a new conversation.
            if e.kind is ErrorKind.CHAT_GONE and not stream.first_event_id and not notice.event_id:
                renewed = await self.context.continue_lost_chat(room, agent, job)
                if renewed is not None:
                    await self._generate(renewed, job)
                    return
            self.log.warning("Agent %s failed in %s: %s", agent.id, room.room_id, e)
            await self._end_tools(room, notice, "the agent failed")
            await stream.failed(e.user_message(agent.id, settings.command_prefix))
            await self.history.mark_processed(room, job.event_id, job.ts)
            return
        except Exception:  # a send or store error: the answer must not end in silence
            self.log.exception("Answering %s in %s failed", job.event_id, room.room_id)
            await asyncio.shield(self._end_broken_answer(room, job, stream))
            return
        finally:
            await typing.stop()
        await self.history.add_tool_run(room, notice.run, notice.event_id)
        if stream.first_event_id:
            await self.history.add_answer(room, stream.full_text, stream.first_event_id, usage)
        if usage is not None and not notice.run.steps:  # with tools, the prompt grew as it went
            self.context.calibrate(agent.id, window.tokens, usage.prompt_tokens)
        await self.history.mark_processed(room, job.event_id, job.ts)

    async def _request(
        self, agent: AgentSpec, backend: Backend, window: Window, room: WorkingRoom
    ) -> GenerationRequest:
        """The request, with the agent's tools when it has some its backend can call."""
        request = self.context.request(agent, window, room)
        tools = []
        if agent.tools and self.tools is not None and backend.features.tools:
            tools = await self.tools.tools_for(agent)
        if not tools:  # earlier tool exchanges go as text: providers refuse calls without tools
            return replace(request, messages=without_tool_messages(request.messages))
        return replace(request, tools=tuple(tools))

    async def _run_turn(
        self,
        agent: AgentSpec,
        backend: Backend,
        request: GenerationRequest,
        stream: StreamedReply,
        notice: ToolNotice,
    ) -> Usage | None:
        """Stream the answer; while the model asks for tools, run them and ask again (bounded)."""
        usage = None
        messages = list(request.messages)
        max_steps = self.settings().tools.max_steps
        for step in range(max_steps + 1):
            calls: tuple = ()
            said_before = len(stream.full_text)
            # What the model says after tool calls is a new paragraph, not glued to its last word.
            apart = step > 0 and bool(stream.full_text) and not stream.full_text.endswith("\n\n")
            # aclosing: a cancelled answer closes its HTTP response at once, not at GC time.
            async with aclosing(backend.stream(replace(request, messages=messages))) as chunks:
                async for chunk in chunks:
                    usage = chunk.usage or usage
                    calls = chunk.tool_calls or calls
                    if chunk.text:
                        if apart:
                            await stream.add("\n\n")
                            said_before, apart = len(stream.full_text), False
                        await stream.add(chunk.text)
            if not calls:
                return usage
            if step == max_steps:
                await notice.end(f"stopped: more than {max_steps} rounds of tool calls in one turn")
                await stream.add(
                    f"\n\n*(stopped: the agent wanted more than {max_steps} rounds of tool calls)*"
                )
                return usage
            await notice.start(calls)
            assert self.tools is not None  # calls only come when tools were offered
            results = await asyncio.gather(*(self.tools.call(agent, call) for call in calls))
            outcomes = [Outcome(c, r.text, r.is_error) for c, r in zip(calls, results, strict=True)]
            await notice.finish_step(outcomes)
            said = stream.full_text[said_before:]
            messages.append(ChatMessage("assistant", said, tool_calls=tuple(calls)))
            messages += notice.run.messages()[-len(outcomes) :]
        return usage

    async def _end_tools(self, room: WorkingRoom, notice: ToolNotice, note: str) -> None:
        """A turn that stopped early still records the calls that ran (they happened)."""
        await notice.end(note)
        await self.history.add_tool_run(room, notice.run, notice.event_id)

    async def _end_broken_answer(self, room: WorkingRoom, job: Job, stream: StreamedReply) -> None:
        """Clear the answer's `partial` marker and tell the user once, as far as Matrix lets us."""
        try:
            await stream.failed(TURN_FAILED)
            await self.history.mark_processed(room, job.event_id, job.ts)
        except Exception as e:  # the homeserver or the database is still failing: log only
            self.log.warning("Could not end the broken answer in %s: %s", room.room_id, e)

    async def _withdraw(self, stream: StreamedReply) -> None:
        """End a posted answer without its text (it may quote the redacted message)."""
        await stream.withdraw(REDACTED_TEXT)

    async def _window_within_budget(self, room: WorkingRoom, agent: AgentSpec, job: Job) -> Window:
        """The request's window; when turns would be left out, compact first (shown in the room)."""
        window = await self.context.window(room, agent, upto_seq=job.upto_seq)
        if not window.over_budget:
            return window
        room_id = room.room_id
        notice = await self.io.send_notice(
            room_id,
            f"Compacting the conversation to fit `{agent.id}`'s context budget…",
            layout.compacting_marker(room.platform_chat_id),
            txn=job.txn("compacting"),
        )
        try:
            result = await self.context.compact(room, agent, upto_seq=job.upto_seq)
        except BackendError as e:
            self.log.warning("Compacting %s with %s failed: %s", room.room_id, agent.id, e)
            await self._edit_notice(
                job,
                notice,
                f"Could not compact the conversation (`{agent.id}`: {e}); this answer uses "
                "the most recent messages that fit.",
            )
            return window
        except asyncio.CancelledError:
            await asyncio.shield(self._edit_notice(job, notice, "Compaction cancelled."))
            raise
        if result is None:
            done = "Nothing older could be summarised; this answer uses the most recent messages that fit."
        else:
            done = (
                f"Compacted the conversation to fit `{agent.id}`'s context budget: "
                f"{result.summarised} older messages are now summarised (below)."
            )
        await self._edit_notice(job, notice, done)
        return await self.context.window(room, agent, upto_seq=job.upto_seq)

    async def _edit_notice(self, job: Job, event_id: EventID, text: str) -> None:
        """The compaction notice's one ending (keyed by its text: each ending is one event)."""
        content = replies.notice(text)
        txn = job.txn(f"compacted {event_id} {content_label(content)}")
        await self.io.edit(job.room_id, event_id, content, txn)

    # redactions

    def redact(self, room_id: str, event_id: str) -> None:
        """`event_id` was redacted: skip it if queued, stop its answer, forget its stored turn.

        Only the owner's messages are queued and stored as user turns, so a redaction of
        anything else finds nothing. Synchronous, so it is in order with the messages around it.
        """
        if self.rooms.room(room_id) is None:
            return
        self._redacted.add(room_id, event_id)  # also covers a message not queued yet (held)
        answering = None
        if self._answering.get(room_id) == event_id:
            answering = self._generating.get(room_id)
            if answering is not None:
                answering.cancel()
        forgetting = self.io.spawn(
            self._forget(room_id, event_id, answering), name=f"forget redacted {event_id}"
        )
        pending = self._forgetting[room_id]
        pending.add(forgetting)
        forgetting.add_done_callback(pending.discard)

    async def _forget(
        self, room_id: str, event_id: str, answering: asyncio.Task[None] | None
    ) -> None:
        if answering is not None:
            await asyncio.wait({answering})  # the cancelled answer ends first: nothing stays
        room = self.rooms.room(room_id)
        if room is not None:
            await self.history.forget_user_turn(room, event_id)

    # commands

    def cancel(self, room_id: str, by: str = "") -> bool:
        """Stop the room's answer; `by` (the `!ai cancel` event id) is named in its ending."""
        generation = self._generating.get(room_id)
        if generation is None or generation.done():
            return False
        if by:
            self._cancelled_by[room_id] = by
        generation.cancel()
        return True

    async def retry(self, room: WorkingRoom, attempt: str = "") -> bool:
        """Answer the last message again; `attempt` (the command's event id) keeps this answer's
        sends apart from the first one's, which the homeserver would otherwise deduplicate."""
        last = await self.history.last_user_turn(room)
        if last is None:
            return False
        self.enqueue(
            Job(
                room.room_id,
                last.event_id or "",
                last.sender or room.owner,
                last.content,
                last.ts,
                retry=True,
                upto_seq=last.seq,
                attempt=attempt,
            )
        )
        return True

    def start_catch_up(self, rooms: list[WorkingRoom]) -> asyncio.Task[None]:
        """Answer what was sent while the bot was down, room by room, in the background.

        A room's live messages wait until its own missed ones are queued, so each room keeps
        its order while rooms with nothing missed answer at once.
        """
        for room in rooms:
            self._held.setdefault(room.room_id, [])
        return self.io.spawn(self._catch_up(rooms), name="catch-up")

    async def _catch_up(self, rooms: list[WorkingRoom]) -> None:
        slots = asyncio.Semaphore(self.settings().reconciliation.concurrency)
        started = time.monotonic()
        caught_up = 0

        async def one(room: WorkingRoom) -> None:
            nonlocal caught_up
            missed: list[Job] = []
            try:
                async with slots:
                    missed = await self.catch_up.missed_in_room(room)
            finally:  # whatever happened, the room's live messages must not stay held
                held = self._held.pop(room.room_id, [])
                caught_up += len(missed)
                for job in [*missed, *held]:
                    self.enqueue(job)

        await asyncio.gather(*(one(room) for room in rooms))
        self.on_caught_up(caught_up, len(rooms), time.monotonic() - started)

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._workers.values()):
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
