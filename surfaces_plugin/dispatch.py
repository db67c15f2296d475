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
from .media import MediaError, MediaService
from .rooms import RoomDirectory, WorkingRoom
from .streaming import CANCELLED_MARK, StreamedReply, Typing
from .tool_runs import Outcome, ToolNotice, ToolSource, marker_for, without_tool_messages
from .txn import content_label
from .usage import Tally, UsageLedger
from .voice import Voice

CaughtUp = Callable[[int, int, float], None]  # (messages, rooms, seconds) once catch-up is done
# What an answer shows once its question is redacted: none of the text it had streamed.
REDACTED_TEXT = "*(cancelled: your message was deleted)*"
# A redaction matters while its message waits in a queue, so the recent ones are enough.
RECENT_REDACTIONS = 1024
# An edit or 🔁 that does not concern the last message: said once per room and process.
EDITS_EXPLAINED = (
    "Editing a message gets a new answer only for your last message: I answer its new text in "
    "place of my answer. Earlier messages stay as the agent saw them; send a new message instead."
)
RETRY_EXPLAINED = (
    "🔁 regenerates only the answer to your last message (in place). For an earlier one, "
    "send a new message."
)
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
        usage: UsageLedger,
        tools: ToolSource | None = None,
        media: MediaService | None = None,
        voice: Voice | None = None,
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
        self.usage = usage  # the token ledger: each answer is counted, quotas are checked
        self.media = media  # images and files: checked before they become turns
        self.voice = voice  # voice messages transcribed; answers spoken where voice is on
        self._queues: dict[str, deque[Job]] = defaultdict(deque)
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._generating: dict[str, asyncio.Task[None]] = {}
        self._answering: dict[str, Job] = {}  # room → the job its generation answers
        self._streams: dict[str, StreamedReply] = {}  # room → the answer being generated
        self._superseded: set[str] = set()  # rooms whose answer stops for an edit or 🔁
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
        attachment = layout.parse_attachment(evt.content.serialize())
        self.enqueue(
            Job(
                room_id=evt.room_id,
                event_id=evt.event_id,
                sender=evt.sender,
                # A string: the app routes only text bodies and media here.
                body=attachment.turn_text if attachment is not None else evt.content.body,
                ts=evt.timestamp,
                attachment=attachment,
            )
        )

    def edit(self, evt: MessageEvent) -> None:
        """The owner edited a message (`evt.content` is the new one, a text, not a command).

        Not answered yet: it is answered once, with the new text. Being answered: that answer
        stops and the new text is answered in its place. Answered: the worker answers it again
        in place of its answer if it is still their last message, else says once what edits do.
        Anyone else's edit changes nothing: only the owner's messages are turns.
        """
        room = self.rooms.room(evt.room_id)
        target = evt.content.get_edit()
        if room is None or evt.sender != room.owner or not target:
            return
        body = evt.content.body
        if self._revise_waiting(evt.room_id, target, body, evt.event_id):
            return
        self._supersede(evt.room_id, target)
        self.enqueue(
            Job(
                evt.room_id,
                target,
                evt.sender,
                body,
                evt.timestamp,
                regenerate=evt.event_id,
                edited=True,
            )
        )

    def regenerate_answer(self, room_id: str, answer_id: str, by: str) -> None:
        """The owner asked (🔁, event `by`) for the answer `answer_id` again: it is regenerated
        in place when it answers their last message (else the worker says once what 🔁 does)."""
        room = self.rooms.room(room_id)
        if room is None:
            return
        current, stream = self._answering.get(room_id), self._streams.get(room_id)
        if current is not None and stream is not None and answer_id in stream.posted:
            if self._supersede(room_id, current.event_id):
                again = Job(
                    room_id, current.event_id, current.sender, current.body, current.ts,
                    regenerate=by, replaces=stream.first_event_id,
                )
                self.enqueue(again)
            return
        self.io.spawn(self._regenerate_stored(room, answer_id, by), name=f"🔁 {answer_id}")

    async def _regenerate_stored(self, room: WorkingRoom, answer_id: str, by: str) -> None:
        turn = await self.history.turn_answered_by(room, answer_id)
        if turn is None or not turn.event_id:
            return  # not an answer of this conversation: nothing to regenerate
        job = Job(
            room.room_id, turn.event_id, turn.sender or room.owner, turn.content, turn.ts,
            regenerate=by, replaces=answer_id,
        )
        self.enqueue(job)

    def stop_answer(self, room_id: str, answer_id: str) -> bool:
        """Stop the room's answer if `answer_id` is one of its messages (⏹️ on it)."""
        stream = self._streams.get(room_id)
        return stream is not None and answer_id in stream.posted and self.cancel(room_id)

    def _revise_waiting(self, room_id: str, target: str, body: str, edit_id: str) -> bool:
        """A job for `target` that has not started answers `body` instead; False when none."""
        for jobs in (self._queues.get(room_id), self._held.get(room_id)):
            for i, job in enumerate(jobs or ()):
                if job.event_id == target and not job.retry:
                    if job.regenerate:  # its sends are now the newest edit's
                        job = replace(job, regenerate=edit_id, edited=True)
                    jobs[i] = replace(job, body=body)
                    return True
        return False

    def _supersede(self, room_id: str, target: str) -> bool:
        """Stop the answer to `target` if it is being generated and no later message waits
        (it is still the owner's last message); True if it was stopped."""
        current, generation = self._answering.get(room_id), self._generating.get(room_id)
        if current is None or current.event_id != target or generation is None:
            return False
        if generation.done() or any(not j.regenerate for j in self._queues.get(room_id, ())):
            return False
        self._superseded.add(room_id)
        generation.cancel()
        return True

    def enqueue(self, job: Job) -> None:
        held = self._held.get(job.room_id)
        if held is not None:
            held.append(job)
            return
        if not job.retry:
            if job.key in self._seen:
                return
            self._seen.add(job.key)
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
        if job.regenerate:
            if await self._refused(room, job):
                return
            revised = await self._revise(room, job)
            if revised is None:
                return
            job = revised
        elif not job.retry and not await self._admit(room, job):
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
        self._answering[room.room_id] = job
        try:
            await generation
        except asyncio.CancelledError:
            if task.cancelling():
                raise  # the worker itself is being stopped
        finally:
            self._generating.pop(room.room_id, None)
            self._answering.pop(room.room_id, None)

    async def _revise(self, room: WorkingRoom, job: Job) -> Job | None:
        """A regeneration of the owner's last message: its stored text becomes the job's and its
        stored answer goes (the new one replaces it in the room too); None when it is not the
        last message (said once)."""
        revision = await self.history.revise_last_turn(room, job.event_id, job.body)
        if revision is None:
            reason, text = ("edits", EDITS_EXPLAINED) if job.edited else ("🔁", RETRY_EXPLAINED)
            key = (room.room_id, reason)
            if key not in self._told_once:
                self._told_once.add(key)
                await self.io.send_notice(room.room_id, text, txn=job.txn("explained"))
            return None
        return replace(
            job,
            ts=revision.ts,  # the processed mark stays the message's own
            upto_seq=revision.seq,
            replaces=job.replaces or revision.answer_event_id,
        )

    async def _admit(self, room: WorkingRoom, job: Job) -> bool:
        """Store a new message as a turn, or say why it is not answered (then it is processed)."""
        if await self.history.is_answered(room, job.event_id, job.ts):
            return False
        if await self._refused(room, job):
            await self.history.mark_processed(room, job.event_id, job.ts)
            return False
        try:
            body = await self._turn_text(room, job)
        except MediaError as e:
            self.log.info("Did not pass on the attachment of %s: %s", job.event_id, e.reason)
            await self.io.send_notice(room.room_id, e.reason, txn=job.txn("refusal"))
            await self.history.mark_processed(room, job.event_id, job.ts)
            return False
        await self.history.add_user_turn(
            room, job.event_id, job.sender, body, job.ts, job.attachment
        )
        return True

    async def _refused(self, room: WorkingRoom, job: Job) -> bool:
        """True, after saying why when there is news, when the job's sender or text may not be
        answered: blocked, too long, too fast (a new message, an edit or a 🔁 alike)."""
        limits = self.settings().limits
        refusal = None
        if not self.access.has_access(job.sender):  # blocked (or no longer allowed) since
            self._refuse_once(room, job.sender)
        elif len(job.body) > limits.max_message_chars:
            refusal = (
                f"That message has {len(job.body)} characters; the limit is "
                f"{limits.max_message_chars}. Send a shorter one."
            )
        elif (over := await self.usage.over_quota(room, job.sender)) is not None:
            refusal = over.text if over.first_today else None  # told once per room and day
        elif not self.limiter.allow(job.sender, limits.per_user_requests_per_minute):
            if self.limiter.first_refusal(job.sender):  # one notice, not one per message
                refusal = (
                    f"You are sending messages faster than the limit "
                    f"({limits.per_user_requests_per_minute} a minute), so I am not answering "
                    "them for now. Wait a little, then send again what you need answered."
                )
        else:
            return False
        if refusal is not None:
            await self.io.send_notice(room.room_id, refusal, txn=job.txn("refusal"))
        return True

    async def _turn_text(self, room: WorkingRoom, job: Job) -> str:
        """The stored turn's text; an attachment is checked first (MediaError: the one notice)."""
        if job.attachment is None:
            return job.body
        if job.attachment.kind == "audio" and self.voice is not None:
            return await self.voice.transcript(room, job)
        if self.media is None:
            raise MediaError("Images and files are not handled here.")
        return await self.media.admit(job.attachment, self.context.agent_of(room))

    async def _generate(self, room: WorkingRoom, job: Job) -> None:
        settings = self.settings()
        agent = self.context.agent_of(room)
        backend = self.backends.for_agent(agent)
        answers = job.event_id or None
        marker = layout.TurnMarker(
            room.platform_chat_id,
            agent.id,
            answers=answers,
            command=job.attempt or None,
            revision=job.regenerate or None,
        )
        stream = StreamedReply(
            self.io,
            self.settings,
            room.room_id,
            marker,
            job.txn,
            replaces=job.replaces,
            streaming=room.streams(settings.streaming.enabled),
        )
        self._streams[room.room_id] = stream
        notice = ToolNotice(
            self.io, room.room_id, marker_for(room.platform_chat_id, agent.id, answers), job.txn
        )
        typing = Typing(self.io, room.room_id, self.log)
        usage = None
        spent = Tally()  # every request of the turn, for the usage ledger
        try:
            window = await self._window_within_budget(room, agent, job)
            chat_id = self.rooms.current(room).platform_chat_id  # compaction may have renewed it
            stream.turn = replace(marker, platform_chat_id=chat_id)
            notice.marker = marker_for(chat_id, agent.id, answers)
            request = await self._request(agent, backend, window, room)
            usage = await self._run_turn(agent, backend, request, stream, notice, spent)
            await typing.stop()  # the agent is done: no typing notice while the answer is sent
            stream.turn = replace(stream.turn, usage=spent.usage)  # on the final version only
            await stream.finish()
            await notice.end()
        except asyncio.CancelledError:
            if room.room_id in self._superseded:  # an edit or 🔁: answered again, in place
                self._superseded.discard(room.room_id)
                await asyncio.shield(self._end_superseded(room, job, stream, notice))
                raise
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
            if self._streams.get(room.room_id) is stream:
                del self._streams[room.room_id]
        await self.history.add_tool_run(room, notice.run, notice.event_id)
        if stream.first_event_id:
            await self.history.add_answer(room, stream.full_text, stream.first_event_id, usage)
        await self.usage.record_answer(room.owner, stream.turn, stream.event_id)
        if usage is not None and not notice.run.steps:  # with tools, the prompt grew as it went
            self.context.calibrate(agent.id, window.tokens, usage.prompt_tokens)
        await self.history.mark_processed(room, job.event_id, job.ts)
        if self.voice is not None:  # the text answer is final: also spoken where voice is on
            await self.voice.speak_answer(self.rooms.current(room), job, stream.full_text)

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
        spent: Tally,
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
            reported = None
            async with aclosing(backend.stream(replace(request, messages=messages))) as chunks:
                async for chunk in chunks:
                    reported = chunk.usage or reported
                    calls = chunk.tool_calls or calls
                    if chunk.text:
                        if apart:
                            await stream.add("\n\n")
                            said_before, apart = len(stream.full_text), False
                        await stream.add(chunk.text)
            usage = reported or usage
            spent.add(reported, messages, stream.full_text[said_before:], calls)
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

    async def _end_superseded(
        self, room: WorkingRoom, job: Job, stream: StreamedReply, notice: ToolNotice
    ) -> None:
        """The answer stops as it is: the regeneration queued behind it edits the same message
        (found through the stored answer), so nothing is said here."""
        await self._end_tools(room, notice, "cancelled")
        if stream.first_event_id:
            await self.history.add_answer(room, stream.full_text, stream.first_event_id, None)
        await self.history.mark_processed(room, job.event_id, job.ts)

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
        current = self._answering.get(room_id)
        if current is not None and current.event_id == event_id:
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
