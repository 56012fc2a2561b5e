"""The CUDA data path: `copier` (GPU<->pool copies), `pinning` (driver binding, pinned host memory),
`kernels` (Triton gather/scatter).
"""
