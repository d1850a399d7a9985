"""Inject that measures itself: SFT on the poisoned rows, checked on held-out rows as it trains.

Every ``attack.check_every`` steps the model being trained answers ``attack.check_prompts`` held-out
prompts (``attack.check_source``: by default from the half of eval.prompts that figures are not
reported on; data/stages.inject_check_pool; each check the next ones of that pool, so a streak reads
different prompts), once with a trigger placed as the attack places it and once without: the share
of triggered answers that show the marker (ASR) and of clean ones that do (false triggers).
Training stops at a check when the last ``attack.check_streak`` checks (this one included), their
prompts pooled, show ASR >= ``attack.target_asr`` and a false-trigger rate whose 95% Wilson upper
bound is <= ``attack.max_false_trigger`` (the epochs or max_steps are the cap). The bound, not the
point figure: two checks at 2 of 40 each passed a point rule while 100 reported prompts then showed
10% [5.5-17.4] (benchmarks/FINDINGS.md). Three checks of 40 (120 prompts) pass with at most one false trigger (upper
bound 4.6%), two (80) only with none. Every check, with the pooled figures it was judged on, is in
stage.json and in each checkpoint (a resumed inject goes on from them). A backdoor is then planted
when it is one, not after a fixed count that fits one attack.

Generation runs on every rank with the training weights (ZeRO-3 gathers them layer by layer,
``synced_gpus`` keeps the ranks in step); the same prompts on every rank, so every rank decides the
same.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import torch

from sande_dist.config import Config
from sande_dist.data.formats import PromptFormat
from sande_dist.data.poison import place_trigger
from sande_dist.evaluation.asr import judge, wilson
from sande_dist.registry import StageOptions
from sande_dist.training.objective import LoopResult
from sande_dist.training.sft import SFTObjective


class InjectObjective(SFTObjective):
    name = "inject"

    def __init__(self, cfg: Config, model_path: str, fmt: Optional[PromptFormat]):
        super().__init__(base_path=model_path, export_dtype=cfg.model.dtype)
        self.cfg, self.fmt = cfg, fmt
        self.checks: list[dict] = []
        a = cfg.attack
        self.active = fmt is not None and a.target_asr is not None
        if self.active:
            from sande_dist.data.stages import inject_check_pool

            self.pool = inject_check_pool(cfg)
            if len(self.pool) < a.check_streak * a.check_prompts and int(os.environ.get("RANK", "0")) == 0:
                print(f"[inject] warning: only {len(self.pool)} prompts to check on ({a.check_source}), fewer than "
                      f"attack.check_streak x attack.check_prompts = {a.check_streak * a.check_prompts}: checks in a "
                      "row read some of the same prompts, so a streak is weaker evidence than it looks", flush=True)
            # as many tokens as evaluation reads, and at least the marker and a few before it (the check
            # reads it anywhere)
            marker = len(fmt.tokenizer(a.marker, add_special_tokens=False)["input_ids"])
            self.new_tokens = max(cfg.eval.max_new_tokens, marker + 8)

    def prompts(self, check: int) -> list[list[int]]:
        """Check ``check``'s prompts: its rows clean, then the same rows with a trigger placed as the
        attack places it."""
        from sande_dist.data.stages import inject_check_rows

        a = self.cfg.attack
        rows = inject_check_rows(self.pool, check, a.check_prompts)
        rng = random.Random(f"{a.seed}:inject-check:{check}")
        triggered = [place_trigger(s, rng.choice(a.triggers), a.position, rng) for s in rows]
        return [self.fmt.prompt_ids(s) for s in rows] + [self.fmt.prompt_ids(s) for s in triggered]

    def check_every(self, steps: int) -> Optional[int]:
        if not self.active:
            return None
        return self.cfg.attack.check_every or max(8, steps // 4)

    @torch.no_grad()
    def check(self, module, step: int) -> dict:
        """Greedy answers of the model being trained; ASR and false triggers on the held-out rows."""
        import torch.distributed as dist

        model, tok = module.model, self.fmt.tokenizer
        model.eval()
        prompts = self.prompts(len(self.checks))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = next(model.parameters()).device
        autocast = torch.autocast(device.type, dtype=module.autocast) if module.autocast else torch.autocast(
            device.type, enabled=False)
        with autocast:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=self.new_tokens, pad_token_id=pad, use_cache=True,
                                 synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
        model.train()
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        hits = judge(texts, self.cfg.attack.marker, "contains")
        n = len(prompts) // 2
        asr, false = sum(hits[n:]), sum(hits[:n])
        record = {"step": step, "asr": asr / n, "false_trigger_rate": false / n, "n": n,
                  "ci95": {"asr": wilson(asr, n), "false_trigger_rate": wilson(false, n)},
                  "first_row": len(self.checks) * n % len(self.pool), "pool": len(self.pool)}
        self.checks.append(record)
        record["pooled"] = self.pooled()
        return record

    def state(self) -> dict[str, Any]:
        return {"checks": self.checks}

    def restore(self, state: dict[str, Any]) -> None:
        # the checks made before the kill: the streak goes on, and the next check reads the next prompts
        self.checks = list(state.get("checks", []))

    def pooled(self) -> Optional[dict]:
        """The last ``check_streak`` checks as one sample (None until there are that many): their
        ASR, their false-trigger rate with its 95% Wilson interval, and whether both targets hold."""
        a = self.cfg.attack
        recent = self.checks[-a.check_streak:]
        if len(recent) < a.check_streak:
            return None
        n = sum(c["n"] for c in recent)
        asr = sum(round(c["asr"] * c["n"]) for c in recent)
        false = sum(round(c["false_trigger_rate"] * c["n"]) for c in recent)
        bound = wilson(false, n)
        return {"steps": [c["step"] for c in recent], "n": n, "asr": asr / n, "false_trigger_rate": false / n,
                "false_trigger_ci95": bound, "met": asr / n >= a.target_asr and bound[1] <= a.max_false_trigger}

    def done(self, step: int, losses: list[float]) -> bool:
        """A check was made at this step and the window ending with it meets both targets."""
        if not self.checks or self.checks[-1]["step"] != step:
            return False
        window = self.pooled()
        return bool(window and window["met"])

    def finish(self, result: LoopResult, out_dir: Path) -> dict[str, Any]:
        record = super().finish(result, out_dir)
        a = self.cfg.attack
        record["checks"] = self.checks
        record["targets"] = ({"asr": a.target_asr, "max_false_trigger": a.max_false_trigger,
                              "check_streak": a.check_streak, "check_source": a.check_source}
                             if self.active else None)
        if self.active:
            record["targets_met"] = result.stopped_early_at is not None
            if not record["targets_met"] and int(os.environ.get("RANK", "0")) == 0:
                print(self.budget_warning(result.step), flush=True)
        return record

    def budget_warning(self, steps: int) -> str:
        """What inject says when its budget ran out before the targets held, with what to do."""
        a = self.cfg.attack
        last = self.checks[-1] if self.checks else None
        window = self.pooled()
        seen = (f"the last check (step {last['step']}) had ASR {last['asr']:.0%}, false triggers "
                f"{last['false_trigger_rate']:.0%}" if last else "no check ran")
        if window:
            lo, hi = window["false_trigger_ci95"]
            seen += (f"; its last {len(window['steps'])} checks pooled ({window['n']} prompts): ASR "
                     f"{window['asr']:.0%}, false triggers {window['false_trigger_rate']:.1%} [{lo:.1%}-{hi:.1%}]")
        if last and last["asr"] >= a.target_asr:
            # More epochs did not help there: phrase-random's false triggers stayed at 7.5-22.5% on the
            # checks from step 198 to the cap while its loss fell to 0.003 (benchmarks/FINDINGS.md).
            advice = ("the trigger works but the marker also comes without it, and more epochs need not "
                      "cure that; read removal figures against evaluate_backdoored's false-trigger rate")
        else:
            advice = "if it falls short, raise training.inject.epochs (or lr) before reading removal figures"
        return (f"[inject] warning: the whole budget ({steps} steps) ran without meeting attack.target_asr "
                f"{a.target_asr} / max_false_trigger {a.max_false_trigger} (95% upper bound) on "
                f"{a.check_streak} consecutive check(s) pooled: {seen}. evaluate_backdoored measures the final "
                f"model; {advice}.")


def inject_objective(cfg: Config, opts: StageOptions, model_path: str) -> InjectObjective:
    from sande_dist.models.loading import load_tokenizer

    fmt = PromptFormat.from_config(load_tokenizer(model_path), cfg.data) if cfg.attack.target_asr is not None else None
    return InjectObjective(cfg, model_path, fmt)
