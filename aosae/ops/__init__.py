"""The op: the k most correlated column pairs of a matrix, without the n × n Gram matrix.

gram_topk.py (dense input; validation, torch.library registration, autograd),
gram_topk_sparse.py ((indices, values) input of TopK SAEs), backward.py (sparse gradient),
backends/ (reference, cpu, sparse, triton and the `auto` policy), conventions.py
(accumulation dtype, norms, the canonical order of pairs), extension.py (loads aosae._C).
"""
