"""Deployment tuning: measure the onnxruntime settings an ONNX file should carry, and carry them.

`tune_model` searches the session options onnxruntime reads from a model's ``ort_config``
(`bnexport.ort_config.CARRIED_KEYS`: intra-op threads, graph optimization level, execution mode),
each with the session config entries of `bnexport.tune.search.SEARCHED_ENTRIES` on and off, at
one target batch size, and writes a copy of the file whose ``ort_config`` (and, for entries,
``bnexport_session_config``) holds the fastest setting, plus a ``bnexport_tune`` metadata record
of the measurement. Nothing else changes: the
copy's bytes differ from the input's only in ``metadata_props``.

Method (the timing core `bnexport.timing.measure_interleaved`, shared with bench: interleaved
rounds in a balanced Latin square, a cool-down before each timing, ratios paired within a round):

1. **screen** every candidate setting, in-process (onnxruntime's default options plus the
   candidate's keys: what onnxruntime builds from an ``ort_config``), a few rounds, ratio against
   onnxruntime's defaults on the input file;
2. **confirm** the best ``finalists``: each is written to a temporary copy with its ``ort_config``
   and opened the way a deployer opts in (``ORT_LOAD_CONFIG_FROM_MODEL=1``, default
   ``SessionOptions``); each session's effective options are read back (a key onnxruntime ignored
   is an error). A copy carrying onnxruntime's *defaults* runs beside them as the *control*: the
   same computation as the reference, so its paired ratio is this run's noise band;
3. **pick** (:func:`pick`): the fastest finalist whose median ratio is above the control's p90
   (faster beyond noise) and whose p10 is not below the control's p10 (not slower beyond noise);
   none: onnxruntime's defaults;
4. **parity** (:func:`check_outputs`): the picked file's outputs against the input model, with
   `check`'s noise-relative rule; a failing finalist is dropped.

The work lives in named modules: `config` (what is asked, what is reported), `search` (the
settings tried, the budget, the pick: pure), `inputs` (the model's inputs and feeds), `sessions`
(sessions and their timing), `check` (the output check), `carry` (``ort_config``, the record,
the writing), `run` (`tune_model` and its stages).
"""

from __future__ import annotations

from bnexport.tune.carry import TUNE_RECORD_KEY, with_ort_config
from bnexport.tune.check import check_outputs
from bnexport.tune.config import (
    CandidateResult,
    Decision,
    ParityResult,
    TuneConfig,
    TuneReport,
    fixed_settings,
)
from bnexport.tune.inputs import ModelInput, make_feeds, model_inputs
from bnexport.tune.run import tune_model
from bnexport.tune.search import (
    busy_warnings,
    candidate_settings,
    noise_band,
    pick,
    plan_repeats,
    thread_counts,
)

__all__ = [
    "TUNE_RECORD_KEY",
    "CandidateResult",
    "Decision",
    "ModelInput",
    "ParityResult",
    "TuneConfig",
    "TuneReport",
    "busy_warnings",
    "candidate_settings",
    "check_outputs",
    "fixed_settings",
    "make_feeds",
    "model_inputs",
    "noise_band",
    "pick",
    "plan_repeats",
    "thread_counts",
    "tune_model",
    "with_ort_config",
]
