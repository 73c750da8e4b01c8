"""What every portals process reads whole and follows: the portal keys (`portal.keys`, the keys
intake accepts: `services.common.portal_keys_view`) and the subscriptions (`portal.subscriptions`),
each a `following.CompactedView`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from services.common.following import CompactedView, Record
from services.common.logging import get_logger
from services.common.topics import portal_subscriptions_spec
from services.portals.subscriptions import InvalidSubscription, Subscription, decode

log = get_logger("motcua.portals.book")


class SubscriptionBook(CompactedView):
    """Every portal's current subscription, by source."""

    name = "subscriptions"

    def __init__(self, bootstrap: str, *, replication: int = 1) -> None:
        super().__init__(bootstrap, portal_subscriptions_spec(), replication=replication)
        self.by_source: dict[str, Subscription] = {}

    def get(self, source: str) -> Subscription | None:
        return self.by_source.get(source)

    def reset(self, records: Iterable[Record]) -> None:
        self.by_source = {}
        for key, value in records:
            self.apply(key, value)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        if not value:  # a deleted subscription
            self.by_source.pop(key.decode(errors="replace"), None)
            return
        try:
            subscription = decode(key, value)
        except InvalidSubscription as exc:
            log.warning("subscription_record_skipped", reason=str(exc))
            return
        known = self.by_source.get(subscription.source)
        if known is None or known.at <= subscription.at:
            self.by_source[subscription.source] = subscription

    def put(self, subscription: Subscription) -> None:
        """Fold in a subscription this process has just written."""
        self.by_source[subscription.source] = subscription

    def delete(self, source: str) -> None:
        self.by_source.pop(source, None)

    def changed_at(self, source: str) -> datetime | None:
        known = self.by_source.get(source)
        return known.at if known is not None else None
