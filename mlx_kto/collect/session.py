"""A chat conversation with a model (and optional adapter): streaming replies and
turning a rated reply into a feedback row. Shared by the terminal and web chats."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_kto.collect.worker import Emit, MLXThread, StopFlag
from mlx_kto.config.core import KTOConfig
from mlx_kto.data.feedback import append_row, rating_row, retraction_row
from mlx_kto.errors import UserError
from mlx_kto.model.load import load_base, load_init_adapter
from mlx_kto.runtime.paths import DEMO_ASSETS

import mlx.core as mx


@dataclass
class Sampling:
    temp: float = field(default=0.7, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1 = off)."})
    max_tokens: int = field(default=256, metadata={"help": "Most tokens per reply."})
    seed: int | None = field(
        default=None, metadata={"help": "Seed for sampling (default: random)."}
    )


def default_model() -> str:
    """The shipped demo model (no download needed)."""
    return str(DEMO_ASSETS / "model")


def load_chat_model(model: str, adapter_path: str | None):
    """(model, tokenizer) through the project's loaders (the same as training: local
    folder, .gguf or hub id; the adapter checked and applied as `--init-adapter` is);
    one-line errors, naming the base an adapter was trained on when it does not fit.
    Every weight is evaluated before this returns: nothing lazy is left tied to the
    loading thread."""
    if adapter_path is not None:
        a = Path(adapter_path)
        if not (a / "adapters.safetensors").exists() or not (a / "adapter_config.json").exists():
            raise UserError(
                f"adapter-path: {a} is not an adapter folder "
                "(needs adapters.safetensors and adapter_config.json)"
            )
    m, tok, path, _ = load_base(KTOConfig(model=model))
    if adapter_path is not None:  # checked as --init-adapter is; another base: one line
        load_init_adapter(m, adapter_path, "--adapter-path")
    m.eval()
    mx.eval(m.parameters())
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{path}: the tokenizer has no chat template; chat needs one")
    return m, tok


@dataclass
class Reply:
    """A generated reply and the conversation it answers (kept to rate it later)."""

    id: str
    prompt: list[dict]  # messages before the reply (system prompt included)
    text: str
    rating_id: str | None = None  # the feedback row currently rating it
    label: bool | None = None


class ChatSession:
    """Conversation state + generation + rating. `messages` holds the accepted turns;
    the latest reply is pending until the user goes on (kept) or regenerates (dropped).
    All MLX work runs on `worker` (the thread the model was loaded on: `open_session`)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str,
        adapter_path: str | None = None,
        feedback: str | Path = "feedback.jsonl",
        system_prompt: str | None = None,
        sampling: Sampling | None = None,
        worker: MLXThread | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.model_name, self.adapter_path = model_name, adapter_path
        self.feedback = Path(feedback)
        self.sampling = sampling or Sampling()
        self.worker = worker or MLXThread()
        self.session_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.replies: dict[str, Reply] = {}
        self._n_generated = 0

    # -- generation -------------------------------------------------------
    def generate(self, prompt: list[dict]) -> Iterator[str]:
        """Text pieces of a sampled reply to `prompt` (a message list ending with the
        user's turn), through the model's chat template and mlx-lm's sampler. Runs on
        the MLX thread (`stream` / `start_stream` put it there)."""
        # Imported on use (measured startup cost): any mlx_lm import loads transformers,
        # ~1 s at the start of every command (cli/app.py imports this module) otherwise.
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        s = self.sampling
        if s.seed is not None:  # reproducible, yet each reply its own draw
            mx.random.seed(s.seed + self._n_generated)
        self._n_generated += 1
        text = self.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        sampler = make_sampler(temp=s.temp, top_p=s.top_p if 0 < s.top_p < 1 else 0.0)
        for r in stream_generate(
            self.model, self.tokenizer, ids, max_tokens=s.max_tokens, sampler=sampler
        ):
            if r.text:
                yield r.text

    def stream(self, prompt: list[dict], stop: StopFlag | None = None) -> Iterator[str]:
        """The reply's pieces on the calling thread, generated on the MLX thread; ends
        early once `stop` is set."""
        return self.worker.stream(lambda: self.generate(prompt), stop or StopFlag())

    def start_stream(self, prompt: list[dict], stop: StopFlag, emit: Emit):
        """Generate on the MLX thread, handing events to `emit` (see MLXThread)."""
        return self.worker.start_stream(lambda: self.generate(prompt), stop, emit)

    def new_reply(self, prompt: list[dict], text: str) -> Reply:
        reply = Reply(uuid.uuid4().hex, [dict(m) for m in prompt], text.strip())
        self.replies[reply.id] = reply
        return reply

    # -- rating -----------------------------------------------------------
    def meta(self) -> dict:
        return {
            "source": "mlx-kto chat",
            "model": self.model_name,
            "adapter": self.adapter_path,
            "sampling": asdict(self.sampling),
            "session": self.session_id,
        }

    def rate(self, reply: Reply, label: bool) -> str:
        """Append a rating row (durable when this returns); a reply rated again has its
        earlier rating retracted first. Returns the new rating's id."""
        if not reply.text:
            raise UserError("the reply is empty; regenerate it before rating")
        if reply.rating_id is not None:
            if reply.label == label:
                return reply.rating_id
            self.undo(reply)
        row = rating_row(reply.prompt, reply.text, label, {**self.meta(), "reply": reply.id})
        append_row(self.feedback, row)
        reply.rating_id, reply.label = row["id"], label
        return row["id"]

    def undo(self, reply: Reply) -> None:
        if reply.rating_id is None:
            return
        append_row(self.feedback, retraction_row(reply.rating_id))
        reply.rating_id, reply.label = None, None


def open_session(
    model: str,
    adapter_path: str | None = None,
    *,
    feedback: str | Path = "feedback.jsonl",
    system_prompt: str | None = None,
    sampling: Sampling | None = None,
) -> ChatSession:
    """A chat session whose model and adapter were loaded on its own MLX thread, the
    thread that then generates every reply."""
    worker = MLXThread()
    m, tok = worker.call(load_chat_model, model, adapter_path)
    return ChatSession(
        m, tok, model_name=model, adapter_path=adapter_path, feedback=feedback,
        system_prompt=system_prompt, sampling=sampling, worker=worker,
    )  # fmt: skip
