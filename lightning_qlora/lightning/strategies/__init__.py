"""QLoRA strategies: ``"qlora"`` (one device), ``"qlora_ddp"`` (Lightning's DDP), ``"qlora_fsdp"`` (Lightning's FSDP2).

Importing this package registers the three names with Lightning's ``StrategyRegistry``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_qlora.lightning.strategies.ddp import QLoRADDPStrategy
from lightning_qlora.lightning.strategies.fsdp import QLoRAFSDPStrategy
from lightning_qlora.lightning.strategies.mixin import QLoRAStrategyMixin
from lightning_qlora.lightning.strategies.single import QLoRAStrategy

_DESCRIPTIONS: dict[type[QLoRAStrategyMixin], str] = {
    QLoRAStrategy: "QLoRA on one device: 4-bit base converted on the device, adapter-only checkpoints",
    QLoRADDPStrategy: "QLoRA data-parallel through Lightning's DDP: each rank quantizes, adapters all-reduced",
    QLoRAFSDPStrategy: "QLoRA fully sharded through Lightning's FSDP2: 4-bit base and adapters sharded over ranks",
}
for _cls, _description in _DESCRIPTIONS.items():
    if _cls.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(_cls.strategy_name, _cls, description=_description)

__all__ = ["QLoRADDPStrategy", "QLoRAFSDPStrategy", "QLoRAStrategy"]
