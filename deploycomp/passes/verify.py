"""verify: the compiled graph must reproduce its reference, or no artifact is emitted.

Fresh random inputs (a new seed per compile, recorded) at several batch sizes are run through the
target backend and through the reference (the torch module the graph came from, or the input ONNX
graph run unoptimized); the relative L2 error of the outputs must stay within tolerance. The
per-sample cosine similarity is recorded alongside: for a model that outputs an embedding (a CLIP
image tower) it is the number its users compare.

A lossy precision (int8) cannot meet a relative L2 of 1e-4, so it gets a fidelity gate instead
(``CompileContext.fidelity``, applied by ``FidelityGate``): on inputs the calibration never saw (the
test split with --data, else Gaussian images of another seed) the per-sample cosine of the outputs
must stay above its threshold, and on real images the artifact's top-1 must agree with the fp32
reference's. On Gaussian images a model's logits are near ties (random-init DeiT-Tiny: cosine
0.9997 yet 92 % agreement), so agreement there is recorded, not gated; nor is it for a model that
outputs an embedding, whose argmax names no class (its gate is the cosine). With --data the gate also
scores top-1 accuracy on every given test image (--eval-samples bounds them), run by the target
runtime, and refuses a drop from the reference's accuracy above ``max_drop`` points. The quantize
pass's accuracy-aware fallback searches against this same gate.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import VerificationError
from .base import CompileContext, Pass, PassResult, register_pass

GATE_BATCH = 256


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    denom = float(np.linalg.norm(expected.astype(np.float64)))
    diff = float(np.linalg.norm(actual.astype(np.float64) - expected.astype(np.float64)))
    return diff / denom if denom > 0 else diff


def cosine_similarity(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Cosine between each sample's output vector and the reference's (batch axis first)."""
    a = actual.reshape(len(actual), -1).astype(np.float64)
    e = expected.reshape(len(expected), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1)
    return np.einsum("ij,ij->i", a, e) / np.maximum(norms, np.finfo(np.float64).tiny)


class FidelityGate:
    """The gate of a lossy precision, prepared once: the held-out inputs, the reference's outputs on
    them, the reference's top-1 on the labelled test images, and the thresholds.

    ``measure(run)`` scores a runner (the target runtime) on the same inputs; ``failures`` says which
    thresholds it misses (empty: passed). The quantize pass's fallback and the verify pass both use it.
    """

    @classmethod
    def of(cls, ctx: CompileContext, model: ir.Model | None = None) -> "FidelityGate":
        """The gate of this compile, prepared once: the quantize pass's fallback and the verify pass
        share the reference's outputs (on --data, a full pass of the torch model over the test set)
        while the reference, the data and the thresholds are the same objects."""
        cached = ctx.results.get("_fidelity_gate")
        if (cached is not None and cached.reference is ctx.reference and cached.test is ctx.test
                and cached.config == dict(ctx.fidelity) and cached.seed == ctx.seed):
            return cached
        gate = ctx.results["_fidelity_gate"] = cls(ctx, model)
        return gate

    def __init__(self, ctx: CompileContext, model: ir.Model | None = None):
        gate = ctx.fidelity
        self.reference, self.config, self.seed = ctx.reference, dict(gate), ctx.seed
        self.min_top1, self.min_cosine = float(gate["top1_agreement"]), float(gate["cosine"])
        self.max_drop = gate.get("max_drop")
        # top-1 (agreement, accuracy) needs classes: an embedding's argmax names none (its gate is the cosine)
        self.gated = ctx.test is not None and ctx.output != "embedding"
        self.output = ctx.output
        n = int(gate["samples"])
        self.test = ctx.test
        if ctx.test is not None:  # the first n test images for agreement and cosine, all of them for accuracy
            self.inputs = ctx.test.head(n).name
            self.n = min(n, len(ctx.test))
            self.labels = ctx.test.labels.numpy()
            want, self.reference_pred = self._run_test(ctx.reference)
        else:
            shape = ctx.input_shape or tuple(d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape)
            self.x = np.random.default_rng(ctx.seed + 2).standard_normal([n, *shape[1:]]).astype(np.float32)
            self.inputs, self.n, self.labels = f"gaussian, seed {ctx.seed + 2}", n, None
            want = np.concatenate([np.asarray(ctx.reference(self.x[i:i + 16])) for i in range(0, n, 16)])
        self.want = want.reshape(len(want), -1)

    def _run_test(self, run) -> tuple[np.ndarray, np.ndarray]:
        """Outputs of the first n test images and top-1 predictions of all, batch by batch."""
        kept, preds = [], []
        for i in range(0, len(self.test), GATE_BATCH):
            images = self.test.images[i:i + GATE_BATCH]
            out = np.asarray(run(self.test.normalize(images).numpy()))
            out = out.reshape(len(out), -1)
            preds.append(out.argmax(1))
            if i < self.n:
                kept.append(out[: self.n - i])
        return np.concatenate(kept), np.concatenate(preds)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def measure(self, run) -> dict[str, float]:
        """Cosine, top-1 agreement and relative L2 against the reference on the held-out inputs; with
        labels also both top-1 accuracies (percent) and the drop in points."""
        if self.labelled:
            got, pred = self._run_test(run)
        else:
            got = np.concatenate([np.asarray(run(self.x[i:i + 16])) for i in range(0, self.n, 16)])
        got = got.reshape(len(got), -1)
        result = {"cosine": float(np.mean(cosine_similarity(got, self.want))),
                  "top1_agreement": float(np.mean(got.argmax(1) == self.want.argmax(1))),
                  "rel_l2": relative_l2(got, self.want)}
        if self.gated:
            ref_correct, art_correct = int((self.reference_pred == self.labels).sum()), int((pred == self.labels).sum())
            result.update(reference_top1=100.0 * ref_correct / len(self.labels),
                          artifact_top1=100.0 * art_correct / len(self.labels),
                          drop_pt=100.0 * (ref_correct - art_correct) / len(self.labels))
        return result

    def failures(self, result: dict[str, float]) -> list[str]:
        """One phrase per missed threshold."""
        out = []
        if self.gated and result["top1_agreement"] < self.min_top1:
            out.append(f"top-1 agreement {result['top1_agreement']:.3f} < min {self.min_top1:g}")
        if not result["cosine"] >= self.min_cosine:
            out.append(f"cosine {result['cosine']:.4f} < min {self.min_cosine:g}")
        if self.gated and self.max_drop is not None and result["drop_pt"] > self.max_drop + 1e-9:
            out.append(f"top-1 accuracy drop {result['drop_pt']:.2f} pt > max {self.max_drop:g} pt (reference "
                       f"{result['reference_top1']:.2f} %, artifact {result['artifact_top1']:.2f} % on "
                       f"{len(self.labels)} {self.test.name} images)")
        return out


@register_pass
class VerifyPass(Pass):
    name = "verify"

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.reference is not None, "no reference to verify against"
        assert ctx.backend is not None, "no backend to run the graph on"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        if ctx.fidelity is not None:
            return self.fidelity_gate(model, ctx)
        run = ctx.backend.runner(model)
        shape = [d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape]
        rng = np.random.default_rng(ctx.seed)
        parity = []
        for batch in ctx.verify_batches:
            x = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
            got, want = run(x), np.asarray(ctx.reference(x))
            if got.shape != want.shape:
                raise VerificationError(f"verification failed: output shape {got.shape} != reference {want.shape} at batch {batch}")
            err = relative_l2(got, want)
            cosine = cosine_similarity(got, want)
            parity.append({"batch": batch, "rel_l2": err, "max_abs": float(np.max(np.abs(got - want))),
                           "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())})
            if not err <= ctx.tolerance:
                raise VerificationError(
                    f"verification failed: relative L2 error {err:.3g} > {ctx.tolerance:g} at batch {batch} "
                    f"against the {ctx.reference_kind} reference; no artifact written"
                )
        ctx.results["parity"] = {"reference": ctx.reference_kind, "tolerance": ctx.tolerance, "seed": ctx.seed,
                                 "output": ctx.output, "checks": parity}
        return PassResult(model, modified=False, info={"max_rel_l2": max(p["rel_l2"] for p in parity)})

    def fidelity_gate(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        gate = FidelityGate.of(ctx, model)
        ctx.results.pop("_fidelity_gate", None)  # not part of the manifest
        result = gate.measure(ctx.backend.runner(model))
        failures = gate.failures(result)
        if failures:
            raise VerificationError(f"fidelity gate failed: {'; '.join(failures)} against the {ctx.reference_kind} "
                                    f"reference on {gate.inputs}; no artifact written")
        ctx.results["parity"] = {
            "reference": ctx.reference_kind, "gate": "fidelity", "inputs": gate.inputs, "samples": gate.n, **result,
            "min_top1_agreement": gate.min_top1, "min_cosine": gate.min_cosine, "agreement_gated": gate.gated,
            "output": gate.output,
            **({"max_drop_pt": gate.max_drop, "accuracy_data": gate.test.name, "accuracy_samples": len(gate.labels)}
               if gate.gated else {}),
            "seed": ctx.seed, "tolerance": None, "checks": []}
        return PassResult(model, modified=False, info={k: result[k] for k in ("top1_agreement", "cosine")})
