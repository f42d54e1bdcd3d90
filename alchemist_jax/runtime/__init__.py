"""The runtime layer: infrastructure every stage uses and none re-implements.

  io           atomic writes, Parquet/JSON readers with one-line errors, id -> pool position
               joins, "this artefact is complete under this fingerprint"
  stats        AUROC, within-group normalisation, rank percentiles (pure numpy)
  parallel     the device mesh, which batch fields reach the models, batch divisibility
  checkpoints  one orbax manager factory; save / restore of a state pytree with its run state
  runlog       metrics.jsonl + TensorBoard writer, readers and curves

Nothing here imports a stage (rating, scoring, selection, training, evaluation, report), the
config or the data package: stages import downward only (docs/ARCHITECTURE.md).
"""
