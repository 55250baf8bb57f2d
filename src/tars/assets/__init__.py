"""Files shipped with tars: `mini_demo.safetensors`, the aligned mini model as a stage pack (`tars demo`).

Made by `tars mini pack` from the `mini:ctc/model` stage (docs/results.md, stage b3) at rank 64.
"""
