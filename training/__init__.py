"""productbg.training: datasets and the two trainers (see docs/training.md).

Modules: ``layout`` (BG60k folder layout), ``bgsynth`` (procedural dataset), ``datasets`` (validating reader,
torch Dataset), ``folder`` (build the layout from a user's photos), ``models`` (base models), ``engine``
(accelerate loop, checkpoints, exact resume), ``cg`` / ``pg`` (Category-Wise / Personality-Wise trainers),
``outputs`` (bank, kohya LoRA, style encoder files). The ``dataset``, ``train-cg`` and ``train-pg`` commands are
``productbg.cli.training``.
Heavy dependencies (diffusers, transformers, peft, accelerate) are imported lazily by the trainers.
"""
