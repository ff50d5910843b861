"""The event bus port: Kafka in the real topology, the durable log table in the embedded one."""

from shared.bus.port import EventBus, Handler, Message

__all__ = ["EventBus", "Handler", "Message"]
