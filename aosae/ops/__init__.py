"""The op: the k most correlated column pairs of a matrix, without the n × n Gram matrix.

gram_topk.py (dense input; validation, torch.library registration, autograd),
gram_topk_sparse.py ((indices, values) input of TopK SAEs), gram_topk_support.py (gradient on
the non-zeros), coactive_topk.py (the training path's never-padded selection, CSR rows),
sparse_coding.py (the sparse SAE step: encode to SparseLatents, decode from them; its dense
oracle in sparse_coding_reference.py), backward.py (sparse gradient),
backends/ (reference, cpu, sparse, triton and the `auto` policy), conventions.py
(accumulation dtype, norms, the canonical order of pairs), extension.py (loads aosae._C).
"""
