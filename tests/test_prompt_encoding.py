"""One prompt encoding per job (issue 14, item 3).

Teacher and student here share one vocabulary and the same special tokens, but not always a
chat template. Under ``data.chat_template: auto`` a teacher that would render a prompt otherwise
than the student is refused by ``kdray validate`` and by the prepare stage, with both renderings
in the message; ``never`` and a template written in the spec are accepted, and then every call
site (the pools' prompt and scoring ids, the trainer's tokenizer, the length check) produces the
same ids, which are checked against ids computed here by hand (whitespace split + vocabulary
lookup of the text the template renders) and against a direct forward pass of the model.

The tokenizers are word-level (``tokenizers`` WordLevel, whitespace split) and the models tiny
random Llamas, built in temporary directories: no toy world, no Ray.
"""

from __future__ import annotations

import json

import pytest
import torch
from rouge_score import rouge_scorer
import yaml

from kdray.cli import main
from kdray.data.examples import TokenizeForTraining, training_batch
from kdray.data.tokenize import (PROBE, PromptEncoding, check_renderings, encode_batch, job_encoding, judge_encoding,
                                 prompt_token_counter, prompt_token_ids)
from kdray.errors import ModelError, SpecError
from kdray.pools.base import SamplingConfig
from kdray.pools.hf import HFGenerator
from kdray.spec import parse_spec
from kdray.stages.context import StageContext
from kdray.stages.prepare import prepare

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "[INST]", "[/INST]", "<<u>>", "<<a>>"]
WORDS = ["w1", "w2", "w3", "w4", "w5", "w6", "ok", "no"] + sorted(set(PROBE.split()))
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}

#: Three templates over the same special tokens: the teacher's, the student's, and one for the spec.
TEACHER_T = ("{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %} <|assistant|>{% endif %}")
STUDENT_T = ("{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %} [/INST]{% endif %}")
SHARED_T = ("{{ bos_token }}{% for m in messages %}<<u>> {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} <<a>>{% endif %}")
#: What each renders for one user turn ``p`` with the generation prompt, written out by hand.
RENDERED = {TEACHER_T: "<|user|> {} <|assistant|>", STUDENT_T: "[INST] {} [/INST]", SHARED_T: "<s><<u>> {} <<a>>",
            None: "{}"}

PROMPTS = ["w1 w2 w3", "w4 w5 w6", "w3 w1 w5"]  # equal lengths: no padding in the pool's batch
RESPONSES = ["ok no ok", "no", "ok ok"]


def by_hand(text: str) -> list[int]:
    """Word-level ids of ``text`` without the tokenizers library: split on whitespace and on the
    special tokens (which the template writes glued to words), then look each piece up."""
    for special in ("<s>", "<<u>>", "<<a>>"):
        text = text.replace(special, f" {special} ")
    return [VOCAB.get(w, VOCAB["<unk>"]) for w in text.split()]


def make_tokenizer(template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = template
    return tok


def make_model_dir(root, name: str, template: str | None) -> str:
    """A loadable model directory: the tokenizer (with ``template``), a config and real weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / name
    make_tokenizer(template).save_pretrained(path)
    torch.manual_seed(0)
    # heads of 32 dimensions and 512 positions: a model a job's vLLM pools run (kdray validate checks)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"teacher": make_model_dir(root, "teacher", TEACHER_T), "student": make_model_dir(root, "student", STUDENT_T),
            "plain": make_model_dir(root, "plain", None), "twin": make_model_dir(root, "twin", TEACHER_T)}


def spec_dict(tmp_path, teacher: str, student: str, chat_template: str = "auto") -> dict:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "response": r}) + "\n"
                            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))))
    return {"name": "enc", "output_dir": str(tmp_path / "out"),
            "teacher": {"model": teacher, "dtype": "float32", "max_model_len": 64},
            "student": {"model": student, "dtype": "float32", "max_model_len": 64},
            "data": {"train": str(data), "heldout": str(data), "chat_template": chat_template,
                     "max_prompt_tokens": 16},
            "generation": {"max_new_tokens": 4},
            "training": {"max_seq_len": 32}}


def validate(tmp_path, spec: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def shown(template: str | None, prompt: str) -> str:
    """How the refusal shows one side: the rendered text and its ids, both by hand."""
    text = RENDERED[template].format(prompt)
    return f"{text!r} → ids {by_hand(text)}"


# -- refused -----------------------------------------------------------------------------------

@pytest.mark.parametrize("student", ["student", "plain"])  # another template; no template at all
def test_validate_refuses_templates_that_differ_showing_both_renderings(tmp_path, models, capsys, student):
    code, out = validate(tmp_path, spec_dict(tmp_path, models["teacher"], models[student]), capsys)
    assert code == 2
    assert "data.chat_template" in out and "render the same prompt differently" in out
    assert shown(TEACHER_T, PROBE) in out
    assert shown(STUDENT_T if student == "student" else None, PROBE) in out
    assert "data.chat_template: never" in out and "Jinja chat template" in out  # the two fixes
    assert "Traceback" not in out


@pytest.mark.parametrize("student", ["student", "plain"])
def test_prepare_refuses_them_before_reading_data(tmp_path, models, student):
    from kdray.pipeline.progress import Reporter

    spec = parse_spec(spec_dict(tmp_path, models["teacher"], models[student]))
    (tmp_path / "rows.jsonl").unlink()  # prepare must stop on the models, before the data
    with pytest.raises(ModelError) as info:
        prepare(StageContext(spec, tmp_path / "out", Reporter(None)))
    message = str(info.value)
    assert shown(TEACHER_T, PROBE) in message
    assert shown(STUDENT_T if student == "student" else None, PROBE) in message
    assert models["teacher"] in message and models[student] in message


def test_a_teacher_that_adds_bos_to_the_same_text_is_refused_too():
    from tokenizers import processors

    teacher, student = make_tokenizer(None), make_tokenizer(None)
    teacher.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    with pytest.raises(ModelError) as info:
        check_renderings("never", teacher, student)
    message = str(info.value)
    assert f"ids {[VOCAB['<s>']] + by_hand(PROBE)}" in message and f"ids {by_hand(PROBE)}" in message
    assert "different special tokens" in message


# -- accepted ----------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["never", SHARED_T])
def test_never_and_a_template_in_the_spec_are_accepted(tmp_path, models, capsys, setting, ray_cpus):
    from kdray.pipeline.progress import Reporter

    spec = spec_dict(tmp_path, models["teacher"], models["student"], setting)
    code, out = validate(tmp_path, spec, capsys)
    assert code == 0, out
    ctx = StageContext(parse_spec(spec), tmp_path / "out", Reporter(None))
    prepared = prepare(ctx)
    assert ctx.prompt_encoding().template == (None if setting == "never" else SHARED_T)
    assert prepared.train.column("prompt").tolist() == PROMPTS


def test_same_templates_are_accepted_and_auto_uses_the_students(tmp_path, models, capsys):
    code, out = validate(tmp_path, spec_dict(tmp_path, models["teacher"], models["twin"]), capsys)
    assert code == 0, out
    encoding = job_encoding(parse_spec(spec_dict(tmp_path, models["teacher"], models["twin"])))
    assert encoding.template == TEACHER_T
    assert check_renderings("auto", make_tokenizer(None), make_tokenizer(None)).template is None


def test_spec_form_of_chat_template(tmp_path, models, capsys):
    base = spec_dict(tmp_path, models["teacher"], models["student"])
    for bad, words in (("nevr", "neither 'auto', 'never' nor a Jinja"), ("tmpl/chat.jinja", "not a file")):
        base["data"]["chat_template"] = bad
        with pytest.raises(SpecError) as info:
            parse_spec(base)
        assert dict(info.value.errors)["data.chat_template"].count(words) == 1
    code, out = validate(tmp_path, spec_dict(tmp_path, "Org/teacher", "Org/student", "{% for m in messages %}"),
                         capsys)  # hub models: the syntax is still checked
    assert code == 2 and "does not parse" in out


# -- one encoding, the same ids at every call site ---------------------------------------------

def test_a_shared_template_gives_the_same_ids_at_every_call_site(tmp_path, models):
    spec = parse_spec(spec_dict(tmp_path, models["teacher"], models["student"], SHARED_T))
    encoding = job_encoding(spec)
    assert job_encoding(spec, check_teacher=False) == encoding  # what a driver-side caller (repro) resolves
    expected = [by_hand(RENDERED[SHARED_T].format(p)) for p in PROMPTS]
    own = PromptEncoding.resolve("auto", make_tokenizer(TEACHER_T)).token_ids(make_tokenizer(TEACHER_T), PROMPTS)
    assert own != expected  # the teacher's own template would have given other ids

    # The trainer (student side), the length check and the teacher-signal scorer's pairs.
    batch = training_batch(TokenizeForTraining(models["student"], 32, encoding),
                           {"prompt": PROMPTS, "response": RESPONSES, "finish_reason": ["stop"] * 3})
    for row, ids in enumerate(expected):
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert (batch["labels"][row, : len(ids)] == -100).all() and batch["labels"][row, len(ids)] != -100
    student_tok = make_tokenizer(STUDENT_T)
    assert prompt_token_counter(student_tok, encoding)(PROMPTS) == [len(ids) for ids in expected]
    assert [p for p, _ in encode_batch(student_tok, PROMPTS, RESPONSES, None, encoding)] == expected
    assert training_batch(TokenizeForTraining(models["student"], 32, SHARED_T),  # the setting resolves the same
                          {"prompt": PROMPTS, "response": RESPONSES, "finish_reason": ["stop"] * 3})["input_ids"].tolist() \
        == batch["input_ids"].tolist()

    # The teacher's pool (hf backend): it encodes with the job's encoding, not its own template.
    gen = HFGenerator(models["teacher"], dtype="float32", max_model_len=64, tensor_parallel_size=1,
                      enforce_eager=True, sampling=SamplingConfig.greedy(3), env={}, score_gold=True,
                      encoding=encoding)
    assert prompt_token_ids(gen.hf.tokenizer, PROMPTS, gen.encoding) == expected
    out = gen({"_row": [0, 1, 2], "id": ["a", "b", "c"], "prompt": PROMPTS, "gold_response": RESPONSES,
               "gold_finish_reason": ["stop"] * 3})
    model = gen.hf.model.double()
    for row, (ids, response) in enumerate(zip(expected, RESPONSES)):
        gold = by_hand(response) + [VOCAB["</s>"]]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + gold])).logits[0], -1)
        nll = -logp[len(ids) - 1: len(ids) + len(gold) - 1].gather(1, torch.tensor(gold)[:, None]).mean()
        assert out["gold_ce"][row] == pytest.approx(float(nll), rel=1e-4)
        # POCL's other measurement, made in the actor: ROUGE-L of this answer against the row's gold
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        assert out["gold_rouge_l"][row] == scorer.score(str(response), str(out["response"][row]))["rougeL"].fmeasure
        seq = list(ids)  # greedy by hand from the job's prompt ids
        for _ in range(3):
            with torch.no_grad():
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == VOCAB["</s>"]:
                break
        assert out["response_token_ids"][row].tolist() == seq[len(ids):]


def test_the_judge_reads_prompts_through_its_own_template():
    judge_tok = make_tokenizer(TEACHER_T)
    assert judge_encoding(SHARED_T, judge_tok).template == TEACHER_T
    assert judge_encoding("auto", judge_tok).template == TEACHER_T
    assert not judge_encoding("never", judge_tok)
    assert judge_encoding("never", judge_tok).token_ids(judge_tok, ["w1 w2"]) == [by_hand("w1 w2")]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['contnet'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",  # a misspelt key renders as ''
    "{{ '' }}"])
def test_a_template_that_drops_the_prompt_is_refused(template):
    tok = make_tokenizer(STUDENT_T)
    with pytest.raises(ModelError, match="drops the prompt: the user turn .* renders as"):
        check_renderings(template, tok, tok)
