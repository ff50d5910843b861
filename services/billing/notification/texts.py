"""What drivers read: short Chinese messages, plates masked as 苏E·12*45, money in yuan."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from shared.money import format_yuan

LOCAL = ZoneInfo("Asia/Shanghai")

DECLINE_REASONS = {
    "insufficient_funds": "余额不足",
    "account_frozen": "账户冻结",
    "agreement_cancelled": "代扣协议已解约",
    "no_account": "未绑定支付账户",
}


def yuan(fen: int) -> str:
    return format_yuan(fen).replace("¥", "") + "元"


def clock(at: datetime) -> str:
    return at.astimezone(LOCAL).strftime("%m月%d日%H:%M")


def duration(d: timedelta) -> str:
    minutes = max(int(d.total_seconds() // 60), 0)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}小时{minutes}分钟" if hours else f"{minutes}分钟"


def entry(plate: str, lot: str, at: datetime) -> tuple[str, str]:
    return (
        "入场提醒",
        f"您的车辆{plate}于{clock(at)}驶入{lot}，本次停车先离场后付费，离场后自动扣费。",
    )


def exit_(
    plate: str, lot: str, entered: datetime, exited: datetime, fee: int | None
) -> tuple[str, str]:
    stay = f"您的车辆{plate}于{clock(exited)}驶离{lot}，停车{duration(exited - entered)}，"
    if fee is None:
        return "离场提醒", stay + "费用计算后另行通知。"
    if fee == 0:
        return "离场提醒", stay + "本次停车免费。"
    return "离场提醒", stay + f"停车费{yuan(fee)}，将从您绑定的账户自动扣款。"


def captured(plate: str, lot: str, fee: int) -> tuple[str, str]:
    return "扣款成功", f"您的车辆{plate}在{lot}的停车费{yuan(fee)}已从绑定账户扣款成功。"


def declined(plate: str, lot: str, fee: int, code: str | None) -> tuple[str, str]:
    reason = DECLINE_REASONS.get(code or "", "支付机构拒绝")
    return (
        "扣款失败",
        f"您的车辆{plate}在{lot}的停车费{yuan(fee)}扣款失败（{reason}），已计入欠费，"
        "请尽快补缴，以免暂停先离场后付费。",
    )


def suspended() -> tuple[str, str]:
    return (
        "先离场后付费已暂停",
        "因欠费未结清，您的先离场后付费服务已暂停，离场时需现场缴费；补缴欠费后自动恢复。",
    )


def restored() -> tuple[str, str]:
    return "先离场后付费已恢复", "您的欠费已结清，先离场后付费服务已恢复。"


def vehicle_superseded(plate: str, at: datetime) -> tuple[str, str]:
    return (
        "车辆已被他人认证",
        f"车辆{plate}已于{clock(at)}由另一位车主通过车辆登记信息认证，已从您的账户移除，"
        "此后的停车记录不再向您显示。如有疑问，请重新添加并认证该车辆。",
    )


def refund(plate: str, lot: str, amount: int, credit_number: str | None) -> tuple[str, str]:
    body = f"您的车辆{plate}在{lot}的停车费已退款{yuan(amount)}，将原路退回绑定账户。"
    if credit_number:
        body += f"已为原发票开具红字发票，号码{credit_number}。"
    return "退款到账", body
