"""`unmask` as an lm-evaluation-harness model, registered under the name `unmask`: any checkpoint
`unmask` loads, any decoder, the harness's three request types.

- `generate_until`: the request's context through `unmask`'s decoding (the preset and any decoder
  field from `model_args`, overridden per request by the task's `gen_kwargs`), cut at the first
  `until` string. Request `i` decodes with the random stream of sample index `i`, so a single
  request gives exactly `unmask sample --prompt CONTEXT --seed SEED` with the same settings.
- `loglikelihood(context, continuation)`: exact for AR checkpoints. For masked (MDLM) and block
  (BD3-LM) diffusion models, the Monte Carlo estimate the LLaDA and Dream evaluations use: the
  context stays visible, continuation tokens are masked at rates drawn stratified over
  `mc_samples` draws, and each draw scores the masked tokens with the NELBO weight of its time.
  The mean is an unbiased estimate of the negative NELBO, a *lower bound* on log p(continuation |
  context) (not the log-likelihood itself); its standard error falls as 1/sqrt(mc_samples).
  `is_greedy` is whether the one-step argmax with the whole continuation masked reproduces it.
  With `likelihood=chain`: the chain-rule log-probability under the left-to-right decoder that
  unmasks one token per pass (`unmask.evaluation.chain`), exact for that decoder and what the
  server's `echo` + `logprobs` reports, so lm-eval's `local-completions` agrees with this model.
- `loglikelihood_rolling(document)`: the same bound over the whole document, in disjoint windows of
  the model's training length each opened by [BOS] (BD3-LM: the blockwise bound); exact per window
  for AR. So perplexity tasks run on diffusion models.

Registration happens on import of this module (lm-eval's `register_model`); `unmask eval lm-eval
...` imports it and then runs lm-eval's own command line.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch
from tqdm.auto import tqdm

from unmask.config import ConfigError, DecodeConfig
from unmask.decoding.batches import Request, decode_batches
from unmask.decoding.plan import DecodeError, plan_decode
from unmask.decoding.presets import preset_config
from unmask.evaluation.chain import chain_logprobs
from unmask.models.checkpoint import load_checkpoint
from unmask.models.transformer import autocast
from unmask.schedules import build_schedule
from unmask.training.objectives import Batch, denoise, diffusion_token_nll

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-eval model needs the optional `lm-eval` package: pip install 'unmask[eval]'"
    ) from e

MC_CHUNK = 64  # Monte Carlo rows per forward batch


@register_model("unmask")
class UnmaskLM(LM):
    """model_args: checkpoint=PATH (required: a run, checkpoint or pretrained directory), preset=NAME
    (default: mdlm, or a pretrained family's own), any DecodeConfig field (steps=64, ...),
    mc_samples (diffusion log-likelihoods), likelihood (mc | chain), seed, precision (auto | fp32 |
    bf16), device, and for
    pretrained directories dtype and tokenizer."""

    def __init__(
        self,
        checkpoint: str | None = None,
        preset: str | None = None,
        mc_samples: int = 16,
        likelihood: str = "mc",
        seed: int = 0,
        precision: str = "auto",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        tokenizer: str | None = None,
        **decode: Any,
    ):
        super().__init__()
        if not checkpoint:
            raise ConfigError("model_args: checkpoint=PATH is required (a run or checkpoint directory)")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ConfigError(f"model_args: mc_samples must be an integer >= 1, got {mc_samples!r}")
        if likelihood not in ("mc", "chain"):
            raise ConfigError(f"model_args: likelihood must be mc or chain, got {likelihood!r}")
        if preset is not None:
            preset_config(str(preset), **decode)  # an unknown preset or field fails before any loading
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: this torch has no CUDA device; pass --device cpu")
        loaded = load_checkpoint(checkpoint, tokenizer=tokenizer, device=self._device, dtype=dtype)
        if preset is None:  # a pretrained family's own decoder (as `unmask sample` and `serve` choose)
            preset = loaded.config.decode.preset if "pretrained" in loaded.state else "mdlm"
        self.decode = preset_config(str(preset), **decode)
        self.model = loaded.model.to(self._device).eval()
        self.tok, self.config, self.checkpoint = loaded.tokenizer, loaded.config, str(checkpoint)
        self.schedule = build_schedule(self.config.noise.schedule, self.config.noise.eps)
        self.kind = self.model.cfg.attention
        self.mc_samples, self.seed, self.precision = mc_samples, seed, precision
        self.likelihood = likelihood
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": our default
        self.max_len = self.config.data.seq_len  # the canvas a bidirectional model was trained on
        self._rendered: set[str] = set()  # contexts `apply_chat_template` produced (encoded as chats)

    # ------------------------------------------------------------------------------ generation

    def _request_config(self, gen_kwargs: dict[str, Any]) -> tuple[DecodeConfig, list[str]]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        kw["max_new_tokens"] = kw.pop("max_gen_toks", self.decode.max_new_tokens)
        if kw.pop("do_sample", None) is False or kw.get("temperature") == 0:
            kw.pop("temperature", None)
            kw["proposal"] = "greedy"
        known = {f.name for f in dataclasses.fields(DecodeConfig)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConfigError(
                f"gen_kwargs: unknown field(s) {unknown}; the decoder takes until, "
                f"max_gen_toks, do_sample and {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self.decode, **kw), until

    def _prompt_ids(self, context: str, plan) -> list[int]:
        """The context's ids: a conversation this model's `apply_chat_template` rendered is encoded
        as one (`sample --chat` and the server's chat endpoint give the same ids), any other text as
        a prompt. A bidirectional canvas holds prompt + new tokens: the context's end is kept."""
        ids = self.tok.encode_chat(context) if context in self._rendered else plan.prompt_ids(context)
        if self.kind == "bidirectional":
            room = self.max_len - plan.cfg.max_new_tokens
            if room < 2:
                raise ConfigError(
                    f"max_gen_toks {plan.cfg.max_new_tokens} leaves no room for a prompt in this model's "
                    f"canvas of {self.max_len} tokens"
                )
            ids = ids[:1] + ids[1:][-(room - 1) :]
        return ids

    def _plan(self, cfg: DecodeConfig):
        max_len = self.max_len if self.kind == "bidirectional" else None
        try:
            return plan_decode(
                self.model,
                cfg,
                schedule=self.schedule,
                tokenizer=self.tok,
                max_len=max_len,
                precision=self.precision,
            )
        except DecodeError as e:
            raise ConfigError(f"gen_kwargs / model_args: {e}") from e

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        plans: dict[DecodeConfig, Any] = {}
        rows = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            cfg, until = self._request_config(gen_kwargs)
            if cfg not in plans:
                plans[cfg] = self._plan(cfg)
            plan = plans[cfg]
            ids = self._prompt_ids(context, plan)
            rows.append(Request(ids, plan, seed=self.seed, index=i, stop=tuple(until)))
        out: list[str] = [""] * len(rows)
        bar = tqdm(total=len(rows), desc="generate_until", disable=disable_tqdm)
        for record in decode_batches(self.model, rows, batch_size=self.batch_size):
            out[record.request.index] = record.text
            bar.update(1)
        bar.close()
        return out

    # ------------------------------------------------------------------------- log-likelihoods

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as lm-eval's own models split them (and so its API models,
        against `unmask serve`): trailing whitespace of the context moves to the continuation, the
        whole text is encoded, and the continuation is what follows the context's own encoding."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            return [], self.tok.encode(continuation)
        context_ids = self.tok.encode(context)
        return context_ids, self.tok.encode(context + continuation)[len(context_ids) :]

    def _fit(self, context: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """[BOS] + context, cut from the left so that context + target fit the training length."""
        if len(target) + 1 > self.max_len:
            raise ConfigError(
                f"a continuation of {len(target)} tokens exceeds this model's length "
                f"{self.max_len} (data.seq_len)"
            )
        keep = self.max_len - len(target) - 1
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        return bos + (context[-keep:] if keep > 0 else []), target

    @torch.no_grad()
    def _ar_logprob(self, prefix: list[int], target: list[int]) -> tuple[float, bool]:
        ids = torch.tensor([prefix + target], device=self._device)
        with autocast(self.precision, self._device):
            logits = self.model(ids[:, :-1]).logits.float()
        logp = logits[0, len(prefix) - 1 :].log_softmax(-1)  # [T, V], row j predicts target[j]
        want = ids[0, len(prefix) :]
        return float(logp.gather(-1, want[:, None]).sum()), bool((logp.argmax(-1) == want).all())

    def _rows(self, prefix: list[int], target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 [1, L] and the scored positions [1, L]; block-causal rows are padded to whole blocks
        with [PAD] after the target (later blocks never reach earlier ones)."""
        ids = prefix + target
        valid = [False] * len(prefix) + [True] * len(target)
        if self.kind == "block_causal":
            pad = -len(ids) % self.model.cfg.block_size
            ids, valid = ids + [self.tok.pad_id] * pad, valid + [False] * pad
        return (torch.tensor([ids], device=self._device), torch.tensor([valid], device=self._device))

    @torch.no_grad()
    def mc_nelbo(self, prefix: list[int], target: list[int], n: int | None = None) -> torch.Tensor:
        """n Monte Carlo draws of the NELBO (nats) of `target` given the visible `prefix` [n]; times
        are stratified over each batch of draws. Seeded by the tokens, so a request's value does
        not depend on where it sits in the request list."""
        n = n or self.mc_samples
        x0, valid = self._rows(prefix, target)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(str(x0.tolist()).encode()))
        out = []
        for start in range(0, n, MC_CHUNK):
            m = min(MC_CHUNK, n - start)
            batch = Batch(x0.expand(m, -1), valid.expand(m, -1))
            with autocast(self.precision, self._device):
                nll, _ = diffusion_token_nll(
                    self.model, batch, self.schedule, g, (self.config.noise.eps, 1.0)
                )
            out.append(nll.float().sum(-1))
        return torch.cat(out)

    def _chain_logprob(self, prefix: list[int], target: list[int]) -> tuple[float, bool]:
        """The target's chain-rule log-probability under the left-to-right one-token decoder, and
        whether each of its tokens is that decoder's argmax (what the server's echo reports)."""
        scores = chain_logprobs(self.model, prefix + target, pad_id=self.tok.pad_id, precision=self.precision)
        span = slice(len(prefix), len(prefix) + len(target))
        greedy = bool((scores.top_ids[span, 0] == torch.tensor(target)).all())
        return float(scores.logprobs[span].sum()), greedy

    @torch.no_grad()
    def _one_step_greedy(self, prefix: list[int], target: list[int]) -> bool:
        x0, valid = self._rows(prefix, target)
        xt = torch.where(valid, self.model.mask_id, x0)
        with autocast(self.precision, self._device):
            logits = denoise(self.model, xt, x0)
        return bool((logits[valid].argmax(-1) == x0[valid]).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            prefix, target = self._fit(*self._pair_ids(*req.args))
            if not target:
                out.append((0.0, True))
            elif self.kind == "causal":
                out.append(self._ar_logprob(prefix, target))
            elif self.likelihood == "chain":
                out.append(self._chain_logprob(prefix, target))
            else:
                estimate = -float(self.mc_nelbo(prefix, target).mean())
                out.append((estimate, self._one_step_greedy(prefix, target)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        W = self.max_len - 1
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tok.encode(req.args[0])
            total = 0.0
            for start in range(0, len(ids), W):
                window = ids[start : start + W]
                if self.kind == "causal":
                    total += self._ar_logprob([self.tok.bos_id], window)[0]
                elif self.likelihood == "chain":
                    total += self._chain_logprob([self.tok.bos_id], window)[0]
                else:
                    total -= float(self.mc_nelbo([self.tok.bos_id], window).mean())
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------ chat

    @property
    def tokenizer_name(self) -> str:
        return f"unmask:{self.checkpoint}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        """The template lm-eval records in its results: the tokenizer's own (pretrained chat models),
        else the name of the repo's `chat` template (what SFT with `--instruct.template chat` uses)."""
        return self.tok.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation through the model's chat template: the same function as `unmask sample
        --chat` and the server's `/v1/chat/completions`."""
        rendered = self.tok.chat(chat_history, add_generation_prompt=add_generation_prompt)
        self._rendered.add(rendered)
        return rendered
