"""TE kernels graphopt writes itself where TVM's legalization is slow or wrong: `blocked`
(channel-blocked NCHWc conv/pool), `winograd` (F(2x2,3x3)/F(4x4,3x3) convs), `minmax` (NaN-aware
reductions), `recurrent` (LSTM/GRU/RNN loops)."""
