"""GroupedLSTM lives in grouped_rnn.py beside GroupedGRU and GroupedRNN; kept for old imports."""
from .grouped_rnn import GroupedLSTM  # noqa: F401
from .paths import path_counts, recurrence_path  # noqa: F401
