"""Lightning's advertisements off: the litlogger and litmodels tips printed on every ``Trainer``.

Lightning 2.6 prints them through ``rank_zero_info`` unless its own LitLogger is in use, with no setting
to turn them off; a filter on that logger drops those two lines and nothing else. Standard library only:
the filter is in place before Lightning is imported.
"""

import logging

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where rank_zero_info writes
TIP_PREFIX = "💡 Tip:"


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def silence_lightning_tips() -> None:
    """Drop Lightning's tips in this process (idempotent)."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _NoTips) for f in logger.filters):
        logger.addFilter(_NoTips())
