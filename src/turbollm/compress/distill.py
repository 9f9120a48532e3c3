"""`turbollm distill`: train a smaller student to match a teacher's next-token distributions,
on CPU, with a progress bar, checkpoints and resume.

Students: any model with the teacher's tokenizer (`--student`, e.g. a structured-pruned copy),
or a copy of the teacher keeping `--student-layers` evenly spaced layers. The whole student is
trained, or only a LoRA adapter on it (`--lora-rank`, saved in PEFT's format). Data: windows of
the built-in corpus (or `--text-file`), or the teacher's own sampled continuations of such
windows (`--data teacher`, on-policy for the teacher: what a draft will be asked to predict).
`--for-draft` trains a speculative draft: total variation on the teacher's generations, since
1 - TV is the chance that speculative sampling accepts a drafted token.

The held-out tail of the corpus (the last tenth, never trained on) measures the student before
and after: perplexity, the loss against the teacher, top-1 agreement (what greedy speculative
decoding accepts) and 1 - TV; they go to DIR/distill_report.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from turbollm.compress.distill_losses import LOSSES, distill_loss

CHECKPOINT = "distill_checkpoint.pt"
REPORT = "distill_report.json"


@dataclass
class DistillConfig:
    teacher: str
    out: str
    student: str | None = None
    student_layers: int | None = None
    loss: str = "forward_kl"
    temperature: float = 1.0
    data: str = "corpus"  # corpus | teacher
    text_file: str | None = None
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float | None = None  # default: 1e-4 for the whole student, 1e-3 for a LoRA adapter
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default: 2 x rank
    for_draft: bool = False
    checkpoint_every: int = 50
    resume: bool = False
    eval_sequences: int = 16
    seed: int = 0
    num_threads: int | None = None
    # matmuls in bf16 (torch autocast; weights, optimizer and losses stay fp32): auto = where
    # the CPU has bf16 math (AMX / AVX-512 BF16: ~2.5x faster steps measured on a 135M
    # teacher), fp32 elsewhere (emulated bf16 is slower than fp32)
    precision: str = "auto"

    def __post_init__(self) -> None:
        if (self.student is None) == (self.student_layers is None):
            raise ValueError("give exactly one of --student and --student-layers")
        if self.for_draft and self.loss == "forward_kl":
            self.loss = "tv"
        if self.for_draft and self.data == "corpus" and self.text_file is None:
            self.data = "teacher"
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.data not in ("corpus", "teacher"):
            raise ValueError(f"data must be corpus or teacher, got {self.data!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_rank and self.student is None:
            raise ValueError("a LoRA adapter needs a saved base: give --student (e.g. a "
                             "layer-dropped or pruned copy written before)")
        if self.lr is None:
            self.lr = 1e-3 if self.lora_rank else 1e-4
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, got "
                             f"{self.precision!r}")

    def autocast(self):
        """The context the forward passes run in."""
        from turbollm.platform_info import cpu_has_native_bf16
        bf16 = self.precision == "bfloat16" or (self.precision == "auto" and
                                                cpu_has_native_bf16())
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


# ----- data -----
def corpus_split(tokenizer, text_file: str | None, max_tokens: int) -> tuple[list, list]:
    """(train ids, held-out ids): the corpus cut 90 / 10, the held-out part last."""
    from turbollm.corpus import corpus_token_ids
    text = Path(text_file).read_text(encoding="utf-8") if text_file else None
    ids = corpus_token_ids(tokenizer, text, max_tokens)
    cut = len(ids) * 9 // 10
    return ids[:cut], ids[cut:]


def training_text(cfg: DistillConfig, tokenizer) -> tuple[list[int], list[list[int]]]:
    """(token ids to train on, the held-out sequences the report measures)."""
    need = (cfg.steps * cfg.batch_size + cfg.eval_sequences) * cfg.seq_len
    train_ids, held_ids = corpus_split(tokenizer, cfg.text_file, max(need * 2, 50_000))
    return train_ids, windows(held_ids, cfg.eval_sequences, cfg.seq_len,
                              random.Random(cfg.seed + 1))


def windows(ids: list[int], count: int, length: int, rng: random.Random) -> list[list[int]]:
    if len(ids) < length + 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one {length}-token window")
    return [ids[s:s + length] for s in (rng.randrange(len(ids) - length) for _ in range(count))]


def teacher_generations(teacher: str, prompts: list[list[int]], new_tokens: int, seed: int,
                        num_threads: int | None) -> list[list[int]]:
    """Each prompt followed by the teacher's sampled continuation (our engine generates)."""
    from turbollm import LLM, SamplingParams
    # one engine seed, not a seed per request: seeded requests would run the batch-invariant
    # (slower) kernels, which reproducibility per request does not need here
    llm = LLM(model=teacher, dtype="float32", num_threads=num_threads, seed=seed,
              max_model_len=max(len(p) for p in prompts) + new_tokens + 1)
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=True)
    return [list(p) + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]


# ----- evaluation -----
@torch.no_grad()
def evaluate(student, teacher, seqs: list[list[int]], loss: str, temperature: float,
             autocast=None) -> dict:
    """Held-out quality of the student, and how close it is to the teacher."""
    with autocast if autocast is not None else contextlib.nullcontext():
        return _evaluate(student, teacher, seqs, loss, temperature)


def _evaluate(student, teacher, seqs: list[list[int]], loss: str, temperature: float) -> dict:
    student.eval()
    nll = t_nll = agree = overlap = dist = n = 0.0
    for seq in seqs:
        ids = torch.tensor([seq])
        s = student(ids).logits[0, :-1].float()
        t = teacher(ids).logits[0, :-1].float()
        target = ids[0, 1:]
        nll += torch.nn.functional.cross_entropy(s, target, reduction="sum").item()
        t_nll += torch.nn.functional.cross_entropy(t, target, reduction="sum").item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        p, q = t.softmax(-1), s.softmax(-1)
        overlap += torch.minimum(p, q).sum(-1).sum().item()  # = 1 - TV per position
        dist += distill_loss(loss, s, t, temperature=temperature).item() * len(target)
        n += len(target)
    student.train()
    return {"perplexity": math.exp(nll / n), "teacher_perplexity": math.exp(t_nll / n),
            "loss_to_teacher": dist / n,
            "top1_agreement": agree / n, "one_minus_tv": overlap / n}


# ----- training -----
def _lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%


def distill(cfg: DistillConfig, progress: bool = True) -> dict:
    """Train the student; write it (or its adapter) and the report to cfg.out."""
    from tqdm import tqdm

    from turbollm.compress.lora_train import add_lora, save_peft
    from turbollm.compress.trainable import (drop_layers, evenly_spaced_layers, load_trainable,
                                             save_hf)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, t_config, tokenizer = load_trainable(cfg.teacher)
    teacher.eval().requires_grad_(False)
    if cfg.student is not None:
        student, s_config, _ = load_trainable(cfg.student)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"the student's vocabulary ({student.config.vocab_size}) is not "
                             f"the teacher's ({teacher.config.vocab_size})")
    else:
        keep = evenly_spaced_layers(teacher.config.num_hidden_layers, cfg.student_layers)
        student, s_config = drop_layers(teacher, keep), dict(t_config)
        student.requires_grad_(True)
    if tokenizer is None:
        raise ValueError(f"{cfg.teacher}: no tokenizer found")

    rng = random.Random(cfg.seed)
    train_ids, held_out = training_text(cfg, tokenizer)
    pool_size = min(cfg.steps * cfg.batch_size, 512)
    if cfg.data == "teacher":
        prefix = max(4, cfg.seq_len // 4)
        pool = teacher_generations(cfg.teacher, windows(train_ids, pool_size, prefix, rng),
                                   cfg.seq_len - prefix, cfg.seed, cfg.num_threads)
    else:
        pool = windows(train_ids, pool_size, cfg.seq_len, rng)

    adapters = None
    if cfg.lora_rank:
        alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
        adapters = add_lora(student, cfg.lora_rank, alpha)
    params = [p for p in student.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, before = 0, None
    ckpt = out / CHECKPOINT
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if {**state["config"], "resume": True} != {**asdict(cfg), "resume": True}:
            raise ValueError(f"{ckpt} was written with other settings; start without --resume")
        student.load_state_dict(state["student"], strict=adapters is None)
        optim.load_state_dict(state["optim"])
        start, before = state["step"], state["before"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
    if before is None:
        before = evaluate(student, teacher, held_out, cfg.loss, cfg.temperature, cfg.autocast())
    student.train()
    bar = tqdm(range(start, cfg.steps), desc="distill", unit="step", initial=start,
               total=cfg.steps, disable=not progress)
    for step in bar:
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, cfg.steps, cfg.lr)
        batch = torch.tensor([pool[rng.randrange(len(pool))] for _ in range(cfg.batch_size)])
        with cfg.autocast():
            with torch.no_grad():
                t_logits = teacher(batch).logits
            s_logits = student(batch).logits
        loss = distill_loss(cfg.loss, s_logits, t_logits, temperature=cfg.temperature)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            trainable = {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}
            torch.save({"step": step + 1, "config": asdict(cfg), "before": before,
                        "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "optim": optim.state_dict(),
                        "student": trainable if adapters else student.state_dict()}, ckpt)
    bar.close()

    after = evaluate(student, teacher, held_out, cfg.loss, cfg.temperature, cfg.autocast())
    if adapters:
        save_peft(adapters, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank,
                  cfg.student, out)
    else:
        save_hf(student, s_config, tokenizer, out)
    report = {"config": asdict(cfg), "before": before, "after": after}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)
    return report


# ----- command line -----
def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a smaller student (or a LoRA adapter on it) to "
                                       "match a teacher; --for-draft makes a speculative draft")
    p.add_argument("--teacher", required=True, help="directory, GGUF file, hub id or preset")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", help="a model with the teacher's tokenizer (e.g. pruned)")
    who.add_argument("--student-layers", type=int,
                     help="a copy of the teacher keeping this many evenly spaced layers")
    p.add_argument("--out", required=True, help="directory to write the student (or adapter)")
    p.add_argument("--loss", choices=LOSSES, default="forward_kl",
                   help="forward_kl (default), reverse_kl, or tv (default with --for-draft)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--data", choices=("corpus", "teacher"), default="corpus",
                   help="corpus windows, or the teacher's own sampled continuations of them "
                        "(default with --for-draft)")
    p.add_argument("--text-file", help="train on this UTF-8 text instead of the built-in corpus")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-4; 1e-3 for a LoRA adapter)")
    p.add_argument("--lora-rank", type=int, help="train only a LoRA adapter of this rank "
                                                 "(PEFT format; needs --student)")
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--for-draft", action="store_true",
                   help="optimize speculative acceptance: tv loss on teacher generations")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int)
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="matmul precision (auto: bf16 where the CPU has bf16 math)")
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    names = {f for f in DistillConfig.__dataclass_fields__}
    cfg = DistillConfig(**{k: v for k, v in vars(args).items() if k in names})
    report = distill(cfg)
    b, a = report["before"], report["after"]
    lost = b["perplexity"] - b["teacher_perplexity"]
    recovered = (b["perplexity"] - a["perplexity"]) / lost if lost > 0 else float("nan")
    print(f"wrote {cfg.out}\nheld-out       before -> after\n"
          f"perplexity     {b['perplexity']:.2f} -> {a['perplexity']:.2f} (teacher "
          f"{b['teacher_perplexity']:.2f}: {recovered:.0%} of the gap recovered)\n"
          f"{cfg.loss:<14} {b['loss_to_teacher']:.4f} -> {a['loss_to_teacher']:.4f}\n"
          f"top-1 agree    {b['top1_agreement']:.3f} -> {a['top1_agreement']:.3f}\n"
          f"1 - TV         {b['one_minus_tv']:.3f} -> {a['one_minus_tv']:.3f}")
    return 0
