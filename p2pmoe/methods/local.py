"""Local training only: the no-communication baseline every table needs."""

from __future__ import annotations

from p2pmoe.methods.base import LearnerMethod, Method
from p2pmoe.methods.registry import BuildContext, MethodSpec, NoOptions, register_method
from p2pmoe.wire.messages import Message, Send


class LocalMethod(LearnerMethod):
    """Each node trains alone and sends nothing."""

    def start_round(self, round_index: int) -> list[Send]:
        return []

    def on_message(self, src: str, message: Message) -> list[Send]:
        return []

    def round_complete(self) -> bool:
        return True


def _client(ctx: BuildContext[NoOptions], node: str) -> Method:
    return LocalMethod(node, ctx.learner(node), ctx.cfg.run.local_epochs, ctx.participation)


register_method(
    MethodSpec(
        name="local",
        summary="each client trains alone and sends nothing (the no-communication baseline)",
        needs=frozenset(),
        options=NoOptions,
        build_client=_client,
    )
)
