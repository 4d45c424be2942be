"""Decode throughput: our jitted KV-cache generation vs HF transformers' PyTorch LLaVA.

  python bench/generate.py --config=configs/bench_small.py [--batch=8 --prompt_len=16 --new=32]

Both models: random init at the config's dims, plain 2-layer MLP projector on the CLIP layer -2
features (class token dropped: 196 visual tokens at 224/16), no Local Clue Aggregator, float32
(``--matmul_dtype`` narrows our decoder's matmuls, ``--torch_dtype`` HF's model, to bfloat16),
greedy, exactly ``--new`` tokens (ours: no EOS id; HF: min_new_tokens = max_new_tokens). The
prompt is one <image> (expanded to the visual tokens) plus ``--prompt_len`` text tokens.

Measured: wall time of a whole generate call (vision + prefill + decode) with ``--new`` tokens
(t_new) and with 1 token (t_1, vision + prefill only; ours: the same ``generate(new)`` program
stopped after its first token, so both calls prefill the same cache: see ``jax_runner``), each
after one warm-up call (so our compile time is excluded). Every side (ours; HF PyTorch with all
cores and with 1 thread) is built first, then the calls INTERLEAVE round by round (each round
times every side's t_new and t_1 back to back; the sides' order rotates each round), so load
from other processes on a shared machine hits every side alike. A decode step's time is the
median over ``--runs`` rounds of (t_new - t_1) / (new - 1), each round's pair taken seconds
apart (this VM's memory speed drifts by tens of % between minutes, and the older
median(t_new) - median(t_1), still reported as ``*_unpaired``, mixed pairs from different
minutes); decode tokens/s = batch / that;
end-to-end tokens/s = batch * new / median(t_new). ``decode_speedup_per_round`` gives the
spread of the round-by-round ratio. PyTorch side: ``torch.inference_mode()``,
``torch.set_num_threads`` = the cores this process may run on (the same cores XLA uses; set
again before each of its calls),
``model.generate(..., do_sample=False, use_cache=True, min_new_tokens=max_new_tokens=new)``
with the default DynamicCache. Ours runs tensor-parallel over ``--tensor`` XLA CPU devices
(default: one per core, as PyTorch gets one thread per core; ``jax_num_cpu_devices``, no other
XLA flags), and with ``--one_device_too`` also on one device (side ``ours_one_device``,
``decode_speedup_one_device``). The 1-minute load average before/after the timed rounds is
recorded: compare runs only under similar load. Prints one JSON object.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/bench_small.py", lock_config=False)
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("prompt_len", 16, "Text tokens after the image.")
flags.DEFINE_integer("new", 32, "New tokens per row.")
flags.DEFINE_integer("runs", 11, "Timed rounds (medians over them).")
flags.DEFINE_bool("torch", True, "Also measure HF transformers (PyTorch).")
flags.DEFINE_bool("torch_one_thread_too", True,
                  "Also measure PyTorch with 1 thread: on a loaded machine its OpenMP barriers can "
                  "make the multi-thread run many times slower; the speedups vs the faster "
                  "PyTorch setting are reported too (decode_speedup_vs_best_torch).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = the cores this process "
                     "may run on, i.e. os.sched_getaffinity).")
flags.DEFINE_integer("tensor", 0, "Ours: split the cores into this many XLA CPU devices and run "
                     "tensor-parallel over them (mesh tensor axis; heads, MLP and vocab split, "
                     "one all-reduce after attention and one after the MLP per layer). 0 = the "
                     "most, up to the cores this process may run on, that the model's dims "
                     "split into. On CPU the attention's batched dots run one thread per "
                     "device, so the split is how they use every core (measured: 1.07-1.27x "
                     "per step at bench_small dims on 2 cores).")
flags.DEFINE_enum("matmul_dtype", "float32", ["float32", "bfloat16"],
                  "Ours: the evaluation view's decoder matmuls (config.eval.matmul_dtype); with "
                  "bfloat16 the greedy tokens' agreement with float32 is reported too. HF stays "
                  "float32 unless --torch_dtype says otherwise.")
flags.DEFINE_enum("torch_dtype", "float32", ["float32", "bfloat16"], "HF PyTorch model dtype.")
flags.DEFINE_bool("one_device_too", True, "With --tensor > 1, also measure ours on one device "
                  "(side ours_one_device) so the split's gain is seen in the same run.")
flags.DEFINE_integer("membw_mib", 512, "MiB per array for the STREAM-style bandwidth measured "
                     "first (bench/membw.py); the decode step's bytes are set against it "
                     "(0 = skip).")
FLAGS = flags.FLAGS

# Dims of configs/bench_small.py, used when --config is not given.
DEFAULT = dict(
    vision=dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                num_layers=6, num_heads=6),
    llm=dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
             num_kv_heads=8, head_dim=64))


def _config():
  if FLAGS.config is not None:
    c = FLAGS.config
  else:
    from feallm_jax import config_files
    c = config_files.get_config(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_synthetic.py"))
    c.model.vision.update(DEFAULT["vision"])
    c.model.llm.update(DEFAULT["llm"])
  c.model.projector = "mlp"
  c.model.local_clues = False
  c.model.vision.hf_path = ""
  c.model.llm.hf_path = ""
  c.model.base_checkpoint = ""
  c.model.param_dtype = c.model.frozen_dtype = c.model.compute_dtype = "float32"
  if int(c.model.llm.get("vocab_size", 0)) <= 0:
    c.model.llm.vocab_size = DEFAULT["llm"]["vocab_size"]
  c.model.image_token_id = int(c.model.llm.vocab_size) - 1
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def jax_runner(c, b, t, n, tensor=1, matmul_dtype="float32"):
  """``run(k)`` for our jitted generation at the config's dims, its label, and (for a
  ``matmul_dtype`` other than float32) the agreement of its ``n`` greedy tokens with float32's.

  ``run(n)`` generates ``n`` tokens. ``run(1)`` is the same ``generate(n)`` call (same program,
  same prefill into a cache of prompt + ``n`` slots) stopped after its first token: each row's
  first token is passed as an EOS id, so the while loop runs no step. ``t_n - t_1`` is then
  exactly ``n - 1`` decode steps. A ``generate(1)`` call would prefill a cache of prompt + 1
  slots, cheaper than the one inside ``generate(n)``, and the difference would count against
  our decode step (0.7 ms of ~20 per step at bench_small dims, measured). HF's DynamicCache
  prefill does not depend on ``max_new_tokens``, so its ``generate(1)`` is already the pair.

  ``tensor``: the model on a ``tensor``-way mesh over the first ``tensor`` devices.
  ``matmul_dtype``: the evaluation view's (``generate.eval_view``)."""
  import jax
  import numpy as np
  from feallm_jax import sharding
  from feallm_jax.eval import generate as gen
  from feallm_jax.models import feallm
  if jax.device_count() < tensor:
    raise ValueError(f"--tensor={tensor} needs {tensor} devices, {jax.device_count()} present")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=tensor), jax.devices()[:tensor])
  model = feallm.build_model(c, mesh)
  s = int(c.model.vision.image_size)
  rng = np.random.default_rng(0)
  ids = rng.integers(10, int(c.model.llm.vocab_size) - 1, (b, t + 1)).astype(np.int32)
  ids[:, 0] = c.model.image_token_id
  batch = dict(image=rng.normal(size=(b, s, s, 3)).astype(np.float32),
               regions=np.zeros((b, 16, 4), np.float32), input_ids=ids,
               attention_mask=np.ones_like(ids))

  # Once, as FEABench does (dropout off, decode layout).
  view = gen.eval_view(model, matmul_dtype=matmul_dtype)

  never = (-1,) * b     # both calls pass b EOS ids: one program (the ids are traced)
  # The first tokens from that same program (it also compiles it: no second program to build).
  first, _ = gen.generate(view, batch, gen.SamplingConfig(max_new_tokens=n, eos_ids=never))
  agreement = None
  if matmul_dtype != "float32":
    ref, _ = gen.generate(gen.eval_view(model), batch,
                          gen.SamplingConfig(max_new_tokens=n, eos_ids=never))
    same = np.asarray(first) == np.asarray(ref)
    # Up to each row's first difference: after it the two continue from different tokens.
    upto = np.where(same.all(1), n, np.argmin(same, axis=1))
    agreement = dict(tokens_equal=float(same.mean()), rows_identical=float(same.all(1).mean()),
                     mean_tokens_before_first_difference=float(upto.mean()),
                     note="random-init weights at the config's dims: greedy rows repeat a few "
                          "tokens; a trained model's answers are the real test")
  stop_at_first = tuple(sorted({int(x) for x in first[:, 0]}))
  stop_at_first += never[len(stop_at_first):]

  def run(k):
    if k not in (1, n):
      raise ValueError(f"jax_runner: run({k}); this runner times {n} and 1 tokens")
    eos = stop_at_first if k == 1 else never
    tokens, lengths = gen.generate(view, batch, gen.SamplingConfig(max_new_tokens=n,
                                                                   eos_ids=eos))
    assert tokens.shape == (b, n)
    assert (lengths == (1 if k == 1 else n)).all(), lengths
  return run, (f"jax {jax.__version__} ({jax.devices()[0].platform}, mesh tensor={tensor} of "
               f"{jax.device_count()} device(s), {_cores()} cores, {matmul_dtype} matmuls)"), \
      agreement


def torch_runner(c, b, t, threads, dtype="float32"):
  """``run(k)`` for HF PyTorch LLaVA at the same dims (in ``dtype``), and its label."""
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  v, l = c.model.vision, c.model.llm
  vocab = int(l.vocab_size)
  image_id = vocab - 1
  vcfg = CLIPVisionConfig(hidden_size=int(v.hidden_size), intermediate_size=int(v.intermediate_size),
                          num_hidden_layers=int(v.num_layers), num_attention_heads=int(v.num_heads),
                          image_size=int(v.image_size), patch_size=int(v.patch_size),
                          hidden_act="quick_gelu")
  tcfg = LlamaConfig(vocab_size=vocab, hidden_size=int(l.hidden_size),
                     intermediate_size=int(l.intermediate_size), num_hidden_layers=int(l.num_layers),
                     num_attention_heads=int(l.num_heads), num_key_value_heads=int(l.num_kv_heads),
                     head_dim=int(l.head_dim), max_position_embeddings=1024,
                     rms_norm_eps=float(l.rms_norm_eps), tie_word_embeddings=False)
  n_vis = (int(v.image_size) // int(v.patch_size)) ** 2
  cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id,
                    projector_hidden_act="gelu", vision_feature_layer=-2,
                    vision_feature_select_strategy="default", image_seq_length=n_vis)
  model = LlavaForConditionalGeneration(cfg).eval().to(getattr(torch, dtype))
  g = torch.Generator().manual_seed(0)
  text = torch.randint(10, vocab - 1, (b, t), generator=g)
  ids = torch.cat([torch.full((b, n_vis), image_id), text], dim=1)
  pixels = torch.randn(b, 3, int(v.image_size), int(v.image_size), generator=g).to(
      getattr(torch, dtype))
  mask = torch.ones_like(ids)

  def run(k):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                           max_new_tokens=k, min_new_tokens=k, do_sample=False,
                           use_cache=True, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] - ids.shape[1] == k, out.shape
  import transformers
  label = (f"torch {torch.__version__} CPU ({threads} threads, {dtype}), transformers "
           f"{transformers.__version__}, LlavaForConditionalGeneration.generate (DynamicCache)")

  def run_threads(k):
    torch.set_num_threads(threads)   # the runners alternate: each sets its own thread count
    run(k)
  return run_threads, label


def main(argv):
  del argv
  c = _config()
  b, t, n = FLAGS.batch, FLAGS.prompt_len, FLAGS.new
  try:
    from bench import cpu_split, interleaved, membw
  except ImportError:   # run as a script (python bench/generate.py): siblings
    import cpu_split
    import interleaved
    import membw
  tensor = cpu_split.tensor_size(c, FLAGS.tensor, _cores())
  import jax
  if tensor > 1:
    # Before any backend starts (nothing above touched a device): the CPU client gets one
    # device per split. An accelerator's devices are what they are: auto (0) means 1 there.
    jax.config.update("jax_num_cpu_devices", tensor)
    if FLAGS.tensor == 0 and jax.default_backend() != "cpu":
      tensor = 1
  runners, labels = {}, {}
  runners["ours"], labels["ours"], agreement = jax_runner(c, b, t, n, tensor, FLAGS.matmul_dtype)
  if tensor > 1 and FLAGS.one_device_too:
    runners["ours_one_device"], labels["ours_one_device"], _ = jax_runner(
        c, b, t, n, 1, FLAGS.matmul_dtype)
  threads = FLAGS.torch_threads or _cores()
  if FLAGS.torch:
    runners["hf_torch"], labels["hf_torch"] = torch_runner(c, b, t, threads, FLAGS.torch_dtype)
    if FLAGS.torch_one_thread_too and threads != 1:
      runners["hf_torch_1thread"], labels["hf_torch_1thread"] = torch_runner(
          c, b, t, 1, FLAGS.torch_dtype)
  bw = membw.measure(FLAGS.membw_mib, runs=5) if FLAGS.membw_mib else None
  timed = interleaved.timed(runners, n, FLAGS.runs)
  visual = (int(c.model.vision.image_size) // int(c.model.vision.patch_size)) ** 2
  out = dict(batch=b, prompt_text_tokens=t, visual_tokens=visual, new_tokens=n,
      runs=FLAGS.runs, method=(
          "every side's generate(new) and generate(1) calls (ours: the same generate(new) "
          "stopped after its first token) interleaved round by round in this "
          "one process (side order rotated each round), after one warm-up each (compile "
          "excluded); ms per decode step = median over rounds of (t_new - t_1)/(new-1), each "
          "round's pair taken back to back; decode tokens/s = batch / that; end-to-end "
          "tokens/s = batch*new/median(t_new); greedy, exactly new tokens; ours: "
          f"{FLAGS.matmul_dtype} decoder matmuls, HF: {FLAGS.torch_dtype}"))
  for name, (all_n, all_1, load) in timed.items():
    out[name] = interleaved.result(labels[name], b, n, all_n, all_1, load)
  if bw is not None:
    prompt = visual + t
    # Ours attends over the fixed-size cache (prompt + new slots); HF's DynamicCache grows,
    # on average prompt + new/2 slots.
    nbytes = dict(weights=membw.llm_weight_bytes(c.model.llm),
                  kv_ours=membw.kv_cache_bytes(c.model.llm, b, prompt + n),
                  kv_hf_mean=membw.kv_cache_bytes(c.model.llm, b, prompt + n / 2),
                  prompt_slots=prompt)
    gbps = bw["best_gbps"]
    floor = {k: 1000 * (nbytes["weights"] + nbytes[kv]) / (gbps * 1e9)
             for k, kv in (("ours", "kv_ours"), ("hf_torch", "kv_hf_mean"))}
    out["roofline"] = dict(
        membw_best_gbps=gbps, membw=bw, step_bytes=nbytes,
        ms_per_step_at_membw=floor,
        fraction_of_membw={k: floor[k] / out[k]["ms_per_decode_step"] for k in floor if k in out})
  if FLAGS.torch:
    out.update(interleaved.speedups(out))
    if "ours_one_device" in out:
      one = interleaved.speedups(dict(out, ours=out["ours_one_device"]))
      out["decode_speedup_one_device"] = one["decode_speedup"]
      out["decode_speedup_one_device_per_round"] = one["decode_speedup_per_round"]
  out["tensor"] = tensor
  out["matmul_dtype"] = FLAGS.matmul_dtype
  if agreement is not None:
    out["ours_vs_float32_tokens"] = agreement
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
