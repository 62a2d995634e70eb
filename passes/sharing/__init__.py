"""Weight sharing: `share-weights` (store identical constants once) and `cluster-weights`
(Deep-Compression-style codebooks: 2^bits shared values per tensor or channel plus per-weight
indices). The stored form of a clustered weight and its standard-ONNX decode are described in
`graphopt.passes.sharing.codebook`.
"""

from graphopt.passes.sharing.cluster import ClusterWeights
from graphopt.passes.sharing.dedup import ShareWeights

__all__ = ["ClusterWeights", "ShareWeights"]
