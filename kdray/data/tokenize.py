"""How one example becomes token ids: prompts for the pools, examples for the trainer.

One job, one prompt encoding. :class:`PromptEncoding` is the chat template every prompt of a
job is rendered with (or none), resolved once from ``data.chat_template`` and the student's
tokenizer (:func:`job_encoding`). Every pool (teacher generation, teacher scoring, student
sampling, POCL's difficulty scoring, evaluation of every model) and the trainer receive that
object and apply it to their own tokenizer, which the job has checked to share the student's
vocabulary and special tokens (:func:`kdray.models.shared_vocab_size`); so a prompt is the same
ids everywhere. :func:`check_renderings` refuses a job whose teacher would render a prompt
otherwise than the student under ``auto`` (another template, or a template against none): the
teacher would answer one prompt and the student be trained on its answer to another.

One function, :func:`encode_batch`, decides which tokens of prompt + response the student
is trained and scored on, so the trainer (:class:`TokenizeForTraining`) and
the scorer (the POCL difficulty measurer in :mod:`kdray.pools`) can never disagree:

* the prompt is tokenized by :func:`prompt_token_ids`: rendered as one user turn with the
  generation prompt by the job's template (transformers' ``apply_chat_template`` rendering,
  then tokenized without added special tokens, as transformers does), or, with no template,
  tokenized as the tokenizer does by default (special tokens included). Generation pools
  receive these ids, never the raw text;
* the response is the generator's own token ids when a pool made it (``response_token_ids``:
  never decoded and re-encoded), else its text tokenized without special tokens, and ends in one
  EOS unless the generator stopped it at the length limit (``finish_reason == "length"``): a
  response that ended on its own teaches the student to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kdray.errors import ModelError

#: The label of positions no loss covers: :data:`kdray.losses.IGNORE_INDEX` (PyTorch's
#: ``ignore_index`` default), restated so that the Ray Data workers that tokenize need not
#: import torch (tests/test_tokenize.py holds the two equal).
IGNORE_INDEX = -100

#: The user turn whose rendering teacher and student must agree on (:func:`check_renderings`):
#: two lines, so that templates which strip or re-join the content differ on it too.
PROBE = "What is 2 + 2?\nAnswer with one number."


def own_template(tokenizer: Any, name: str = "the tokenizer") -> str | None:
    """The chat template ``tokenizer`` uses by default (transformers' choice: its template, or the
    one named ``default`` of several), or None when it has none.

    Raises:
        ModelError: it has several named templates and none is ``default``.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        if "default" not in template:
            raise ModelError(f"{name} has several chat templates ({', '.join(sorted(template))}) and none named "
                             "'default'; paste the one to use into data.chat_template")
        template = template["default"]
    return template or None


@dataclass(frozen=True)
class PromptEncoding:
    """How a job's prompts become token ids, in every pool and in the trainer.

    Attributes:
        template: the Jinja chat template that renders each prompt as one user turn with the
            generation prompt (``messages=[{"role": "user", "content": prompt}]``,
            ``add_generation_prompt=True``, the tokenizer's special tokens as variables, as in
            transformers' ``apply_chat_template``); None: the raw prompt text.
        origin: where it came from, for messages ("the student's chat template", ...).

    The object is truthy when a template wraps prompts. It is small and picklable: pools and the
    trainer's tokenizing actor receive it through Ray.
    """

    template: str | None = None
    origin: str = "no chat template"

    def __bool__(self) -> bool:
        return self.template is not None

    @classmethod
    def resolve(cls, setting: str, tokenizer: Any, name: str = "the student's") -> "PromptEncoding":
        """The encoding ``data.chat_template`` (``setting``) asks for, given the tokenizer of the
        model whose template ``auto`` means (the student's, for a job): ``never`` → none;
        ``auto`` → that tokenizer's own template, or none when it has none; anything else is a
        Jinja template given in the spec.

        Raises:
            ModelError: ``auto`` and the tokenizer has several templates, none of them ``default``.
        """
        if setting == "never":
            return cls(None, "data.chat_template: never")
        if setting == "auto":
            template = own_template(tokenizer, f"{name} tokenizer")
            return cls(template, f"{name} chat template" if template else f"{name} tokenizer has no chat template")
        return cls(setting, "the template in data.chat_template")

    def render(self, tokenizer: Any, prompts: list[str]) -> list[str]:
        """The text each prompt becomes before tokenization (the prompt itself without a template)."""
        if self.template is None:
            return [str(p) for p in prompts]
        convs = [[{"role": "user", "content": str(p)}] for p in prompts]
        return list(tokenizer.apply_chat_template(convs, chat_template=self.template, add_generation_prompt=True,
                                                  tokenize=False))

    def token_ids(self, tokenizer: Any, prompts: list[str]) -> list[list[int]]:
        """Each prompt's ids: the rendered text tokenized without added special tokens (the
        template writes them), or the raw prompt tokenized as the tokenizer does by default."""
        if not prompts:
            return []
        if self.template is None:
            return [[int(t) for t in ids] for ids in tokenizer([str(p) for p in prompts]).input_ids]
        encoded = tokenizer(self.render(tokenizer, prompts), add_special_tokens=False).input_ids
        return [[int(t) for t in ids] for ids in encoded]


def _as_encoding(tokenizer: Any, encoding: "PromptEncoding | bool | str") -> PromptEncoding:
    """A :class:`PromptEncoding` from the forms callers pass: the object itself, a
    ``data.chat_template`` setting (resolved against ``tokenizer``), or a bool (True: the
    tokenizer's own template, for direct use outside a job)."""
    if isinstance(encoding, PromptEncoding):
        return encoding
    if isinstance(encoding, str):
        return PromptEncoding.resolve(encoding, tokenizer, "the")
    return PromptEncoding.resolve("auto" if encoding else "never", tokenizer, "the")


def uses_chat_template(tokenizer: Any, setting: str) -> PromptEncoding:
    """The encoding ``data.chat_template`` (``setting``) gives with ``tokenizer``'s template
    (:meth:`PromptEncoding.resolve`): truthy when prompts are wrapped by a template."""
    return PromptEncoding.resolve(setting, tokenizer, "the")


def judge_encoding(setting: str, tokenizer: Any) -> PromptEncoding:
    """The LLM judge's encoding: its own chat template (none under ``data.chat_template: never``).
    The judge may be of another model family: the job's template is the teacher's and student's."""
    return PromptEncoding.resolve("never" if setting == "never" else "auto", tokenizer, "the judge's")


def prompt_token_ids(tokenizer: Any, prompts: list[str], encoding: "PromptEncoding | bool") -> list[list[int]]:
    """The token ids of each prompt under ``encoding`` (:meth:`PromptEncoding.token_ids`); a
    bool means the tokenizer's own template (True) or none (False)."""
    return _as_encoding(tokenizer, encoding).token_ids(tokenizer, [str(p) for p in prompts])


def _rendering(encoding: PromptEncoding, tokenizer: Any, role: str) -> tuple[str, list[int]]:
    """(text, ids) of :data:`PROBE` under ``encoding``, or a :class:`ModelError` when the
    template does not render a user turn, or renders one without the prompt in it (Jinja renders
    an undefined name, e.g. a misspelt ``message['content']``, as empty text)."""
    from jinja2 import TemplateError

    try:
        text, ids = encoding.render(tokenizer, [PROBE])[0], encoding.token_ids(tokenizer, [PROBE])[0]
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{encoding.origin} does not render a user turn for the {role} "
                         f"({type(exc).__name__}: {exc}); fix the template in data.chat_template, or set "
                         "data.chat_template: never") from None
    if encoding and any(line not in text for line in PROBE.splitlines()):
        raise ModelError(f"{encoding.origin} drops the prompt: the user turn {PROBE!r} renders as {text!r} for the "
                         f"{role}, so every prompt would look the same; the template must write each message's "
                         "content (message['content']): fix it in data.chat_template, or set data.chat_template: "
                         "never")
    return text, ids


def template_syntax_error(setting: str) -> str | None:
    """What is wrong with the Jinja syntax of a template given in ``data.chat_template``
    (None for ``auto``, ``never`` and a template that parses); needs no tokenizer."""
    if setting in ("auto", "never"):
        return None
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(setting)
    except TemplateSyntaxError as exc:
        return f"the Jinja chat template does not parse (line {exc.lineno}: {exc.message}); fix it"
    return None


def _shown(text: str, ids: list[int], limit: int = 64) -> str:
    more = f", … {len(ids) - limit} more" if len(ids) > limit else ""
    return f"{text!r} → ids [{', '.join(map(str, ids[:limit]))}{more}]"


def check_renderings(setting: str, teacher_tok: Any, student_tok: Any, teacher: str = "teacher",
                     student: str = "student") -> PromptEncoding:
    """The job's encoding (:meth:`PromptEncoding.resolve` on the student's tokenizer), once the
    teacher is shown to see a prompt as the student does.

    Each side renders :data:`PROBE` as one user turn with the generation prompt the way it would
    on its own: under ``auto`` with its own template (or none), under ``never`` or a spec's
    template with the same one, through its own tokenizer. The rendered texts and the token ids
    must be equal.

    Args:
        setting: ``data.chat_template``.
        teacher_tok, student_tok: the two tokenizers (same vocabulary and special tokens).
        teacher, student: the models' references, for the message.

    Raises:
        ModelError: the renderings differ; the message shows both side by side and the fix
            (``data.chat_template: never``, or one template in the spec that both use); or the
            template does not render.
    """
    encoding = PromptEncoding.resolve(setting, student_tok)
    theirs = PromptEncoding.resolve(setting, teacher_tok, "the teacher's") if setting == "auto" else encoding
    t_text, t_ids = _rendering(theirs, teacher_tok, "teacher")
    s_text, s_ids = _rendering(encoding, student_tok, "student")
    if (t_text, t_ids) == (s_text, s_ids):
        return encoding
    if t_text == s_text:
        why = ("the same text becomes different ids (the tokenizers add different special tokens, e.g. BOS)",
               "save both models with the same tokenizer files")
    else:
        why = ("the teacher would answer one prompt and the student be trained on that answer as if to another",
               "set data.chat_template: never (both get the raw prompt text), or paste one Jinja chat template "
               "into data.chat_template (e.g. the teacher's, from its tokenizer_config.json or chat_template.jinja) "
               "that both then use")
    raise ModelError(
        f"teacher.model {teacher!r} and student.model {student!r} render the same prompt differently under "
        f"data.chat_template: {setting if setting in ('auto', 'never') else '<template>'}: {why[0]}. The user turn "
        f"{PROBE!r} with the generation prompt becomes\n"
        f"    teacher ({theirs.origin}): {_shown(t_text, t_ids)}\n"
        f"    student ({encoding.origin}): {_shown(s_text, s_ids)}\n"
        f"  Fix: {why[1]}"
    )


def job_encoding(spec: Any, *, check_teacher: bool = True) -> PromptEncoding:
    """The prompt encoding of the job ``spec`` (a :class:`kdray.spec.JobSpec`): resolved from
    ``data.chat_template`` and the student's tokenizer, and with ``check_teacher`` checked
    against the teacher's (:func:`check_renderings`).

    Raises:
        ModelError: a tokenizer does not load, or the renderings differ.
    """
    from kdray.models import load_tokenizer

    student_tok = load_tokenizer(spec.student.model, need_pad=False)
    if not check_teacher:
        return PromptEncoding.resolve(spec.data.chat_template, student_tok)
    teacher_tok = load_tokenizer(spec.teacher.model, need_pad=False)
    return check_renderings(spec.data.chat_template, teacher_tok, student_tok, spec.teacher.model, spec.student.model)


def encode_batch(tokenizer: Any, prompts: list[str], responses: list[str], finish_reasons: list[str] | None,
                 encoding: "PromptEncoding | bool" = False,
                 response_ids: list[Any] | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example: the prompt under ``encoding``
    (:func:`prompt_token_ids`), then the response, ending in exactly one EOS unless its
    ``finish_reason`` is ``"length"`` (cut at the limit: no EOS).

    The response is the generator's own token ids where ``response_ids`` gives them (a pool's
    ``response_token_ids``; None, or None for a row, means text only): decoding and re-encoding
    can change ids, and would turn a reply's literal text of a special token (``</s>``) into
    that special token, teaching the student to stop there. The stop token a finished
    generation ends with (EOS or another special token) is replaced by the tokenizer's EOS, as
    the text path, which decodes without special tokens, does. Text responses (a dataset's) are tokenized without special tokens.
    """
    prompt_ids = prompt_token_ids(tokenizer, prompts, encoding)
    given = response_ids if response_ids is not None else [None] * len(prompt_ids)
    todo = [i for i, ids in enumerate(given) if ids is None]
    texts = tokenizer([str(responses[i]) for i in todo], add_special_tokens=False).input_ids if todo else []
    from_text = dict(zip(todo, texts))
    eos = tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", ())) | {eos}
    out = []
    for i in range(len(prompt_ids)):
        resp = [int(t) for t in (from_text[i] if given[i] is None else given[i])]
        finished = finish_reasons is None or str(finish_reasons[i]) != "length"
        if finished and given[i] is not None and resp and resp[-1] in special:
            resp.pop()  # the generator's stop token (EOS or another): the tokenizer's EOS ends it below
        if finished:
            resp.append(eos)
        out.append((list(prompt_ids[i]), resp))
    return out


def pack_examples(pairs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, Any]:
    """(prompt ids, response ids) pairs → fixed-length ``input_ids``, ``attention_mask`` and
    ``labels`` (int64 numpy, right-padded, cut at ``max_len``). Labels are the response tokens;
    the prompt and the padding are ``IGNORE_INDEX``, so losses cover only what the student must learn."""
    import numpy as np

    n = len(pairs)
    ids = np.full((n, max_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    labels = np.full((n, max_len), IGNORE_INDEX, dtype=np.int64)
    for i, (prompt, response) in enumerate(pairs):
        seq = (list(prompt) + list(response))[:max_len]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = seq[len(prompt) :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_token_counter(tokenizer: Any, encoding: "PromptEncoding | str") -> Callable[[list[str]], list[int]]:
    """A function giving each prompt's token count as the pools will see it
    (:func:`prompt_token_ids` under ``encoding``, or a ``data.chat_template`` setting)."""
    enc = _as_encoding(tokenizer, encoding)
    return lambda prompts: [len(ids) for ids in enc.token_ids(tokenizer, prompts)]


def split_prompt_response(input_ids: Any, attention_mask: Any, labels: Any) -> list[tuple[list[int], list[int]]]:
    """Undo :func:`pack_examples` for a batch (tensors ``[rows, positions]``): (prompt ids, response
    ids) per row."""
    pairs = []
    for ids, mask, lab in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        length = sum(mask)
        start = next((j for j, v in enumerate(lab) if v != IGNORE_INDEX), length)
        pairs.append((ids[:start], ids[start:length]))
    return pairs
