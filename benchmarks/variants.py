"""Variant speed, measured in one run as ratios of medians (noisy machines: rounds interleave contenders).

The built-in text model (all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes reviews; batch 1, a held-out review of
median length): torch eager, plain and optimized (fused) ONNX Runtime FP32, and each INT8 recipe of ``RECIPES``
with its top-1 agreement with the PyTorch model on the held-out reviews. The INT8 reported is the fastest that
keeps agreement >= 0.99 and passes the batch gate (the same answer alone and inside batches). Sessions run one
thread each by default (--threads 1), interleaved in 9 rounds, so two runs agree on the ratios. Then the distilled
text student (``modelship distill``, a third of the layers) against its teacher, both ONNX Runtime FP32, and its
held-out accuracy over the teacher's. Digits: the distilled student / teacher p50 at batch 1 (ONNX Runtime).

Usage: python benchmarks/variants.py [--rounds 9] [--seconds 1] [--threads 1] [--json PATH]
--json writes fp32_over_torch (best FP32 / torch), int8_over_fp32 (best INT8 / best FP32), int8_agreement,
int8_recipe, int8_size_ratio, int8_batch_max_diff and int8_batch_bound (its batch gate), int8_batch_max_diff_per_tensor (per-channel
dynamic INT8 alone vs batched), every recipe's ratio,
agreement and batch verdict, cpu_flags and int8_kernels (where it ran), threads and rounds,
text_student_over_teacher, text_student_accuracy_ratio and student_over_teacher (digits, ONNX Runtime).
"""

import argparse
import statistics
from pathlib import Path

import numpy as np

from modelship import data as datasets
from modelship.bench import measure, scratch, write_figures
from modelship.exporters.onnx_export import export
from modelship.machine import kernel_facts
from modelship.models import zoo
from modelship.models.checkpoints import open_source
from modelship.models.train import train_artifact
from modelship.preprocess import open_preprocessor
from modelship.quantization.distill import distill
from modelship.quantization.variants import QuantizeOptions, make_variant
from modelship.runners import open_runner
from modelship.stages import parity_record


def _ffn(part: str) -> list[str]:
    return [f"/encoder/encoder/layer.{i}/{part}/dense/MatMul" for i in range(6)]


# (graph, mode, options): the INT8 recipes tried on the text model, plainest first
RECIPES = {
    "dynamic": ("plain", "dynamic", QuantizeOptions()),
    "dynamic, per-channel": ("plain", "dynamic", QuantizeOptions(per_channel=True)),
    "dynamic, per-channel, all FFN in float": ("plain", "dynamic", QuantizeOptions(
        per_channel=True, exclude_nodes=_ffn("intermediate") + _ffn("output"))),
    "dynamic, per-channel, SmoothQuant 0.9": ("plain", "dynamic", QuantizeOptions(per_channel=True, smooth=0.9)),
    "optimized, dynamic, per-channel": ("optimized", "dynamic", QuantizeOptions(per_channel=True)),
    "static QDQ, MatMul, per-channel, minmax, SmoothQuant 0.8": ("plain", "static", QuantizeOptions(
        per_channel=True, op_types=["MatMul"], smooth=0.8)),
    "per-row, block 64 (TEXT_INT8, the demo's)": (
        "plain", "dynamic", QuantizeOptions(**{k: v for k, v in zoo.TEXT_INT8.items() if k != "mode"})),
    "optimized, per-row, block 32": ("optimized", "dynamic", QuantizeOptions(activations="per-row", block_size=32)),
    "optimized, per-row, block 64": ("optimized", "dynamic", QuantizeOptions(activations="per-row", block_size=64)),
    "optimized, per-row, block 128": ("optimized", "dynamic", QuantizeOptions(activations="per-row",
                                                                            block_size=128)),
}


def rounds(fns: dict, n: int, seconds: float) -> dict:
    p50 = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            p50[k].append(float(np.median(measure(fn, seconds))))
    return p50


def ratio(p50: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(p50[a], p50[b]))


def show(p50: dict) -> None:
    for k, v in p50.items():
        print(f"  {k:58s} p50 {statistics.median(v):9.3f} ms")


def median_review(art) -> dict:
    """A held-out review of median token length, as the model takes it."""
    texts, _ = datasets.load_raw(art.manifest.data, "test")
    prep = open_preprocessor(art)
    lengths = [int(prep([t])[0]["attention_mask"].sum()) for t in texts[:400]]
    return prep([texts[int(np.argsort(lengths)[len(lengths) // 2])]])[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="threads per session (1: steady ratios; 0: all)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    tmp = Path(scratch())
    facts = kernel_facts()
    print(f"CPU: {facts['cpu']}; INT8 kernels: {facts['kernels']} (flags {', '.join(facts['flags'])})")

    text = train_artifact("text", tmp / "text")
    src, module = open_source(text.path)
    fp32 = export(src, module, tmp / "text-onnx")
    graphs = {"plain": fp32, "optimized": make_variant(fp32, "optimize", tmp / "text-opt")}
    int8s, agree, batch = {}, {}, {}
    for i, (name, (graph, mode, opts)) in enumerate(RECIPES.items()):
        int8s[name] = make_variant(graphs[graph], mode, tmp / f"int8-{i}", opts)
        rec = parity_record(int8s[name], reference=(src, module))
        agree[name], batch[name] = rec["top1_agreement"], rec["batch"]
        print(f"  int8 {name}: top-1 agreement {agree[name]:.4f} on {text.manifest.extra['test_samples']} held-out "
              f"reviews; batch gate {'passed' if batch[name]['passed'] else 'FAILED'} (alone vs batched: max "
              f"{batch[name]['max_abs_diff']:.3g}, bound {batch[name]['bound']:.3g})", flush=True)
    runners = {"torch eager": open_runner(text), "onnxruntime fp32": open_runner(fp32, threads=args.threads),
               "onnxruntime fp32 optimized": open_runner(graphs["optimized"], threads=args.threads),
               **{f"int8 {k}": open_runner(a, threads=args.threads) for k, a in int8s.items()}}
    feed = median_review(fp32)
    p50 = rounds({k: (lambda r=r: r.infer(feed)) for k, r in runners.items()}, args.rounds, args.seconds)
    print(f"built-in text model (MiniLM), batch 1, a review of {feed['input_ids'].shape[1]} tokens")
    show(p50)
    med = {k: statistics.median(v) for k, v in p50.items()}
    best_fp32 = min(("onnxruntime fp32", "onnxruntime fp32 optimized"), key=med.get)
    print(f"ratio {best_fp32} / torch eager: {ratio(p50, best_fp32, 'torch eager'):.3f}")
    for k in int8s:
        print(f"  int8 {k:56s} / best fp32 {ratio(p50, f'int8 {k}', best_fp32):.3f}, agreement {agree[k]:.4f}, "
              f"same at any batch: {'yes' if batch[k]['passed'] else 'NO'}")
    right = [k for k in int8s if agree[k] is not None and agree[k] >= 0.99 and batch[k]["passed"]]
    best = min(right or list(int8s), key=lambda k: med[f"int8 {k}"])
    print(f"fastest int8 with agreement >= 0.99 and the same answers at any batch: {best if right else 'none'}; "
          f"ratio to {best_fp32}: {ratio(p50, f'int8 {best}', best_fp32):.3f} (goal <= 0.55 on VNNI, <= 0.70 on "
          f"AVX2); {args.threads or 'all'} thread(s) per session")
    figures = {"cpu_flags": facts["flags"], "int8_kernels": facts["kernels"],
               "fp32_over_torch": ratio(p50, best_fp32, "torch eager"),
               "int8_over_fp32": ratio(p50, f"int8 {best}", best_fp32), "int8_agreement": agree[best],
               "int8_recipe": best if right else None, "int8_batch_max_diff": batch[best]["max_abs_diff"],
               "int8_batch_bound": batch[best]["bound"], "threads": args.threads, "rounds": args.rounds,
               **{f"int8_batch_passed[{k}]": batch[k]["passed"] for k in int8s},
               **{f"int8_batch_max_diff[{k}]": batch[k]["max_abs_diff"] for k in int8s},
               # what one scale per batch does to the text model: per-channel dynamic INT8 alone vs batched
               "int8_batch_max_diff_per_tensor": batch["dynamic, per-channel"]["max_abs_diff"],
               "int8_size_ratio": int8s[best].model_path.stat().st_size / fp32.model_path.stat().st_size,
               "best_fp32": best_fp32,
               **{f"int8_over_fp32[{k}]": ratio(p50, f"int8 {k}", best_fp32) for k in int8s},
               **{f"int8_agreement[{k}]": agree[k] for k in int8s}}

    student, report = distill(text.path, tmp / "text-student")
    s_src, s_mod = open_source(student.path)
    s_onnx = export(s_src, s_mod, tmp / "text-student-onnx")
    runners = {"teacher onnxruntime": runners["onnxruntime fp32"], "student onnxruntime": open_runner(s_onnx)}
    p50 = rounds({k: (lambda r=r: r.infer(feed)) for k, r in runners.items()}, args.rounds, args.seconds)
    print(f"text: teacher ({report['teacher']['layers']} layers, accuracy {report['teacher']['accuracy']:.4f}) vs "
          f"student ({report['student']['layers']} layers, accuracy {report['student']['accuracy']:.4f})")
    show(p50)
    figures["text_student_over_teacher"] = ratio(p50, "student onnxruntime", "teacher onnxruntime")
    figures["text_student_accuracy_ratio"] = report["accuracy_ratio"]
    print(f"ratio text student / teacher p50, onnxruntime: {figures['text_student_over_teacher']:.3f} (goal <= 0.5); "
          f"accuracy ratio {report['accuracy_ratio']:.3f} (goal >= 0.97)")

    teacher = train_artifact("cnn", tmp / "cnn")
    student, report = distill(teacher.path, tmp / "student")
    t_src, t_mod = open_source(teacher.path)
    s_src, s_mod = open_source(student.path)
    runners = {"teacher onnxruntime": open_runner(export(t_src, t_mod, tmp / "t-onnx")),
               "student onnxruntime": open_runner(export(s_src, s_mod, tmp / "s-onnx"))}
    feed = {"pixels": np.zeros([1, *zoo.entry("cnn").inputs[0]["shape"][1:]], np.float32)}
    p50 = rounds({k: (lambda r=r: r.infer(feed)) for k, r in runners.items()}, args.rounds, args.seconds)
    print(f"digits: teacher {report['teacher']['arch']} vs student {report['student']['arch']}, batch 1")
    show(p50)
    figures["student_over_teacher"] = ratio(p50, "student onnxruntime", "teacher onnxruntime")
    print(f"ratio student / teacher p50, onnxruntime: {figures['student_over_teacher']:.3f} (goal <= 0.4)")
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
