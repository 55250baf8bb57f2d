"""Files shipped with tars, so a fresh machine has the mini model's trained stages without re-running them.

`mini_demo.safetensors`: the CTC-aligned mini model (`mini:demo`), `tars mini pack` of `mini:ctc/model` at
rank 64. `mini_soft.safetensors`: the soft-projector model with a representational gap (`mini:soft`),
packed against `mini:demo`. `mini_soft_tars/`: the TARS adapter of the mini table's TARS row on
`mini:soft` (`mini:soft-tars`; `tars mini ship-adapter`), its json saying how it was made.
"""
