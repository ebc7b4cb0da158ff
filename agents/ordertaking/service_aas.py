"""The order-taking service's own AAS: a shell and the ``OrderTaking`` submodel with the ``TakeOrder`` Operation.

``TakeOrder`` inputs: ``aas`` (Blob: the product instance's AAS as V3.1 JSON — ``contentType``
``application/json`` — or as an AASX package — ``application/asset-administration-shell-package+xml``; a
Property holding the JSON text is accepted too), ``productType``, ``priority`` (xs:int 1..5), ``due``
(xs:double, simulated time), ``notificationUrl`` (xs:anyURI), ``customization`` (xs:string: a JSON object),
``idempotencyKey`` (xs:string). Outputs: ``orderId``, ``status``, ``product`` (the product twin's short name).
"""

from __future__ import annotations

from collections.abc import Iterable

from basyx.aas import model
from basyx.aas.model import datatypes as DT

from agents.aas import build, ids

__all__ = ["OPERATION", "SUBMODEL", "SUBMODEL_SEMANTIC_ID", "service_objects"]

SUBMODEL = "OrderTaking"
OPERATION = "TakeOrder"
SUBMODEL_SEMANTIC_ID = "https://twinbid.dev/aas/OrderTaking/1/0"
OPERATION_SEMANTIC_ID = "https://twinbid.dev/aas/OrderTaking/TakeOrder/1/0"

INPUTS: tuple[tuple[str, type], ...] = (
    ("productType", DT.String),
    ("priority", DT.Int),
    ("due", DT.Double),
    ("notificationUrl", DT.AnyURI),
    ("customization", DT.String),
    ("idempotencyKey", DT.String),
)
OUTPUTS: tuple[tuple[str, type], ...] = (
    ("orderId", DT.String),
    ("status", DT.String),
    ("product", DT.String),
)


def take_order_operation() -> model.Operation:
    inputs: list[model.SubmodelElement] = [
        model.Blob(
            "aas",
            content_type="application/json",
            description=model.MultiLanguageTextType(
                {
                    "en": "the product instance's AAS: V3.1 JSON environment or an AASX package (set contentType)"
                }
            ),
        )
    ]
    inputs += [model.Property(name, value_type=vt) for name, vt in INPUTS]
    return model.Operation(
        OPERATION,
        input_variable=inputs,
        output_variable=[model.Property(name, value_type=vt) for name, vt in OUTPUTS],
        semantic_id=build.ext_ref(OPERATION_SEMANTIC_ID),
        description=model.MultiLanguageTextType(
            {"en": "Submit a product instance's AAS as a manufacturing order"}
        ),
    )


def service_objects(
    short_name: str, namespace: str, product_types: Iterable[str], max_upload_bytes: int
) -> tuple[model.AssetAdministrationShell, model.Submodel]:
    types = model.SubmodelElementList(
        "ProductTypes",
        model.Property,
        value=[model.Property(None, value_type=DT.String, value=t) for t in sorted(product_types)],
        value_type_list_element=DT.String,
        order_relevant=False,
    )
    sm = build.submodel(
        ids.submodel_id(short_name, SUBMODEL, namespace),
        SUBMODEL,
        SUBMODEL_SEMANTIC_ID,
        [
            take_order_operation(),
            types,
            build.prop("OrdersEndpoint", None, DT.AnyURI),
            build.prop("MaxUploadBytes", max_upload_bytes, DT.Long),
        ],
        description="Order intake: vendors submit product instance AASs (TakeOrder, or POST /orders)",
    )
    shell = build.shell(
        ids.shell_id(short_name, namespace),
        build.to_id_short(short_name.replace("-", "_"), "S"),
        global_asset_id=ids.asset_id(short_name, namespace),
        asset_type="order-taking",
        submodels=[sm],
        description="twinbid order-taking service",
    )
    return shell, sm
