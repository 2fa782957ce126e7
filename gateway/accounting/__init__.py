"""Stage 8: what each request cost, a ledger over time windows, and budgets."""

from gateway.accounting.ledger import Ledger, LedgerLine, charge

__all__ = ["Ledger", "LedgerLine", "charge"]
