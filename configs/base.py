"""Defaults shared by every stage: a small Llama-3-style model on CPython's docs.

The stage configs import this file and change only what their stage needs.
Run it directly (it trains next-token prediction alone):

  python launch/train.py --config=configs/base.py --workdir=runs/base

Any field can be overridden on the command line, for example
`--config.train.steps=100 --config.data.train_files='corpus/*.txt'`.
"""

import ml_collections


def get_config():
  """Returns the base configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Workdir of an earlier run whose latest parameters initialise this one
  # (optimizer state and step start fresh). Empty: random initialisation.
  config.init_from = ""

  # Model: Llama 3's architecture, shrunk so that the default job runs on a
  # laptop CPU. Llama 3 8B is embed_dim=4096, num_layers=32, num_heads=32,
  # num_kv_heads=8, mlp_dim=14336, vocab_size=128256.
  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 128
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.head_dim = 32
  config.model.mlp_dim = 384
  config.model.rope_theta = 500_000.0
  config.model.norm_eps = 1e-5
  config.model.tie_embeddings = False
  config.model.dtype = "float32"  # Compute dtype; "bfloat16" on accelerators.
  config.model.param_dtype = "float32"
  # One compiled block scanned over the layers (params get a leading
  # "layers" axis); False unrolls a Python loop over layers_0, layers_1, ...
  config.model.scan_layers = True
  # Activation checkpointing per block: "none", "full" or "dots" (keep the
  # weight matmul outputs, recompute the rest in the backward pass).
  config.model.remat_policy = "none"

  # Input pipeline. An empty train_files reads the documentation that ships
  # with CPython, so the default job needs no download.
  config.data = ml_collections.ConfigDict()
  # Comma-separated globs of .txt/.jsonl/.parquet/.array_record files or
  # directories of them.
  config.data.train_files = ""
  # Sampling weight of each glob in train_files, comma-separated; empty:
  # proportional to each glob's number of documents.
  config.data.train_weights = ""
  config.data.jsonl_field = "text"
  config.data.tokenizer = ""  # SentencePiece model; empty: train one.
  config.data.vocab_size = 4096
  config.data.seq_len = 128
  config.data.batch_size = 16  # Global batch, in packed examples.
  config.data.task_rates = ml_collections.ConfigDict(
      {"lm": 1.0, "mlm": 0.0, "rtd": 0.0, "sop": 0.0})
  config.data.mask_rate = 0.15  # Share of real tokens selected by mlm/rtd.
  # What mlm/rtd select: "token" (BERT), "whole_word" (every piece of a word;
  # each CJK character is a word) or "span" (SpanBERT's geometric spans).
  config.data.mlm_variant = "token"
  config.data.sop_num_segments = 2  # k; the sop head has k! classes.
  config.data.max_bad_fraction = 0.01  # Error above this share of bad records.
  config.data.num_workers = 0  # Grain worker processes; 0 reads in-process.
  config.data.shuffle_seed = 0

  # Replaced-token detection: where replacements come from ("random",
  # "unigram" or "generator") and the ELECTRA generator's shape.
  config.rtd = ml_collections.ConfigDict()
  config.rtd.replacements = "random"
  config.rtd.generator_width_fraction = 0.25
  # The generator's mlm loss gets the rtd weight divided by this, as ELECTRA
  # weights its discriminator 50 times its generator.
  config.rtd.discriminator_weight = 50.0

  # Loss options of the token objectives.
  config.loss = ml_collections.ConfigDict()
  config.loss.label_smoothing = 0.1  # lm only.
  config.loss.z_loss = 1e-4
  config.loss.chunk_size = 1024  # Vocabulary block of the fused loss.

  # Task weighting; see docs/weighting.md for the strategies and arguments.
  config.weighting = ml_collections.ConfigDict()
  config.weighting.name = "static"
  config.weighting.weights = ml_collections.ConfigDict(
      {"lm": 1.0, "mlm": 1.0, "rtd": 1.0, "sop": 1.0})
  # Arguments of the other strategies; only the section of `name` is read.
  # "scheduled": per task a number or {"kind": "constant", "value": v},
  # {"kind": "linear", "init", "end", "begin", "steps"} (a ramp from step
  # `begin` over `steps` steps) or {"kind": "piecewise_constant", "values",
  # "boundaries"}.
  config.weighting.schedules = ml_collections.ConfigDict({
      "lm": {"kind": "constant", "value": 1.0},
      "mlm": {"kind": "constant", "value": 1.0},
      "rtd": {"kind": "constant", "value": 1.0},
      "sop": {"kind": "constant", "value": 1.0},
  })
  config.weighting.dwa = ml_collections.ConfigDict(
      {"temperature": 2.0, "window": 20})  # window: updates per mean loss.
  config.weighting.famo = ml_collections.ConfigDict(
      {"learning_rate": 0.025, "gamma": 0.001, "min_loss": 1e-8})
  config.weighting.gradnorm = ml_collections.ConfigDict(
      {"alpha": 1.5, "learning_rate": 0.025})
  config.weighting.relative_progress = ml_collections.ConfigDict(
      {"max_change": 0.01, "temperature": 0.2, "ema_decay": 0.9})
  # Bounds applied to any strategy. With normalize=True the weights are
  # rescaled by one factor so that, after clipping to [floor, cap], they sum
  # to the number of tasks.
  config.weighting.floors = ml_collections.ConfigDict(
      {"lm": 0.0, "mlm": 0.0, "rtd": 0.0, "sop": 0.0})
  config.weighting.caps = ml_collections.ConfigDict(
      {"lm": float("inf"), "mlm": float("inf"), "rtd": float("inf"),
       "sop": float("inf")})
  config.weighting.normalize = False

  # AdamW with linear warmup and cosine decay.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.end_learning_rate_factor = 0.1
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.clip_norm = 1.0

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300
  config.train.log_every = 10
  config.train.checkpoint_every = 100
  config.train.max_checkpoints_to_keep = 3
  # Splits each batch into this many micro-batches, run one after another,
  # for the same step with less activation memory (one extra forward pass
  # per micro-batch, because the task weights need the whole batch's losses).
  config.train.gradient_accumulation_steps = 1

  # Device mesh. -1 takes the devices left after the other axes.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  return config
