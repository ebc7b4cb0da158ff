"""semanticIds used in twinbid's AASs, as named constants — one place, so every agent agrees.

Three sources, in order of preference:

1. **Published IDTA submodel templates**, used verbatim:
   - IDTA 02006-3-0 *Digital Nameplate for Industrial Equipment* (submodel
     ``https://admin-shell.io/idta/nameplate/3/0/Nameplate``; element ids are the IEC CDD IRDIs of the
     template, the ECLASS IRDIs are its supplemental ids; address elements from the IDTA 02002 drop-in),
   - IDTA 02020-1-0 *Capability Description* (``https://admin-shell.io/idta/CapabilityDescription/...``).
2. **Modelled on a template whose identifiers we could not obtain**: the process documentation follows the
   structure of IDTA 02031-2 *Executed Processes* (one collection per executed step with times, resource,
   outcome), but carries our own ids under ``https://twinbid.dev/aas/ProcessDocumentation/...`` so we never
   claim an id we have not verified.
3. **Our own** under ``https://twinbid.dev/...`` where no template exists (orders, process plans,
   bidding parameters, live status). Versioned ``/1/0`` like IDTA ids, so a future change can bump them.

Capabilities themselves are named ``https://twinbid.dev/capabilities/<name>`` unless a scenario gives
another id (see docs/CONTRIBUTING-CONTRACTS.md); :func:`capability_semantic_id` builds that default.
"""

from __future__ import annotations

from typing import Final

TWINBID: Final = "https://twinbid.dev"
CAPABILITY_PREFIX: Final = f"{TWINBID}/capabilities/"


def capability_semantic_id(name: str) -> str:
    """The default semanticId of a capability short name (``milling`` -> ``https://twinbid.dev/capabilities/milling``)."""
    return name if "://" in name or name.startswith("urn:") else CAPABILITY_PREFIX + name


def _tw(path: str) -> str:
    return f"{TWINBID}/aas/{path}"


# ---------------------------------------------------------------------------------------------------------------------
# IDTA 02006-3-0 Digital Nameplate (published; ids copied from the template)
# ---------------------------------------------------------------------------------------------------------------------


class Nameplate:
    """Digital Nameplate 3.0: submodel id, element ids (IEC CDD), ECLASS supplemental ids."""

    SUBMODEL: Final = "https://admin-shell.io/idta/nameplate/3/0/Nameplate"
    TEMPLATE_ID: Final = "https://admin-shell.io/IDTA 02006-3-0"

    URI_OF_THE_PRODUCT: Final = "0112/2///61987#ABN590#002"
    MANUFACTURER_NAME: Final = "0112/2///61987#ABA565#009"
    MANUFACTURER_PRODUCT_DESIGNATION: Final = "0112/2///61987#ABA567#009"
    ADDRESS_INFORMATION: Final = (
        "https://admin-shell.io/zvei/nameplate/1/0/ContactInformations/AddressInformation"
    )
    MANUFACTURER_PRODUCT_ROOT: Final = "0112/2///61360_7#AAS011#001"
    MANUFACTURER_PRODUCT_FAMILY: Final = "0112/2///61987#ABP464#002"
    MANUFACTURER_PRODUCT_TYPE: Final = "0112/2///61987#ABA300#008"
    ORDER_CODE_OF_MANUFACTURER: Final = "0112/2///61987#ABA950#008"
    PRODUCT_ARTICLE_NUMBER_OF_MANUFACTURER: Final = "0112/2///61987#ABA581#007"
    SERIAL_NUMBER: Final = "0112/2///61987#ABA951#009"
    YEAR_OF_CONSTRUCTION: Final = "0112/2///61987#ABP000#002"
    DATE_OF_MANUFACTURE: Final = "0112/2///61987#ABB757#007"
    HARDWARE_VERSION: Final = "0112/2///61987#ABA926#008"
    FIRMWARE_VERSION: Final = "0112/2///61987#ABA302#006"
    SOFTWARE_VERSION: Final = "0112/2///61987#ABA601#008"
    COUNTRY_OF_ORIGIN: Final = "0112/2///61987#ABP462#001"
    UNIQUE_FACILITY_IDENTIFIER: Final = "https://admin-shell.io/idta/nameplate/3/0/UniqueFacilityIdentifier"

    # ECLASS ids the template lists as supplementalSemanticIds of the elements above.
    ECLASS: Final[dict[str, str]] = {
        URI_OF_THE_PRODUCT: "0173-1#02-ABH173#003",
        MANUFACTURER_NAME: "0173-1#02-AAO677#004",
        MANUFACTURER_PRODUCT_DESIGNATION: "0173-1#02-AAW338#003",
        MANUFACTURER_PRODUCT_ROOT: "0173-1#02-AAU732#003",
        MANUFACTURER_PRODUCT_FAMILY: "0173-1#02-AAU731#003",
        MANUFACTURER_PRODUCT_TYPE: "0173-1#02-AAO057#004",
        ORDER_CODE_OF_MANUFACTURER: "0173-1#02-AAO227#004",
        PRODUCT_ARTICLE_NUMBER_OF_MANUFACTURER: "0173-1#02-AAO676#005",
        SERIAL_NUMBER: "0173-1#02-AAM556#004",
        YEAR_OF_CONSTRUCTION: "0173-1#02-AAP906#003",
        DATE_OF_MANUFACTURE: "0173-1#02-AAR972#004",
        HARDWARE_VERSION: "0173-1#02-AAN270#004",
        SOFTWARE_VERSION: "0173-1#02-AAM737#004",
        COUNTRY_OF_ORIGIN: "0173-1#02-AAO259#007",
    }

    # Address drop-in (IDTA 02002 Contact Information), used inside AddressInformation.
    STREET: Final = "0173-1#02-AAO128#002"
    ZIPCODE: Final = "0173-1#02-AAO129#002"
    CITY_TOWN: Final = "0173-1#02-AAO132#002"
    NATIONAL_CODE: Final = "0173-1#02-AAO134#002"


# ---------------------------------------------------------------------------------------------------------------------
# IDTA 02020-1-0 Capability Description (published)
# ---------------------------------------------------------------------------------------------------------------------


class CapabilityDescription:
    """Capability Description 1.0. The ``Capability`` element's own semanticId is the concrete capability
    (``https://twinbid.dev/capabilities/milling``); :attr:`CAPABILITY` is added as its supplemental id.
    Some tools use ``https://admin-shell.io/idta/SubmodelTemplate/CapabilityDescription/1/0`` as the submodel
    id; we use the ``.../1/0/Submodel`` form and accept both when reading (:attr:`SUBMODEL_ALIASES`)."""

    SUBMODEL: Final = "https://admin-shell.io/idta/CapabilityDescription/1/0/Submodel"
    SUBMODEL_ALIASES: Final = (
        SUBMODEL,
        "https://admin-shell.io/idta/SubmodelTemplate/CapabilityDescription/1/0",
    )
    CAPABILITY_SET: Final = "https://admin-shell.io/idta/CapabilityDescription/CapabilitySet/1/0"
    CAPABILITY_CONTAINER: Final = "https://admin-shell.io/idta/CapabilityDescription/CapabilityContainer/1/0"
    CAPABILITY: Final = "https://admin-shell.io/idta/CapabilityDescription/Capability/1/0"
    CAPABILITY_COMMENT: Final = "https://admin-shell.io/idta/CapabilityDescription/CapabilityComment/1/0"
    PROPERTY_SET: Final = "https://admin-shell.io/idta/CapabilityDescription/PropertySet/1/0"
    PROPERTY_CONTAINER: Final = "https://admin-shell.io/idta/CapabilityDescription/PropertyContainer/1/0"


# ---------------------------------------------------------------------------------------------------------------------
# Process documentation, modelled on IDTA 02031-2 Executed Processes (our ids)
# ---------------------------------------------------------------------------------------------------------------------


class ProcessDocumentation:
    """One ``StepRecord`` collection per executed (or attempted) process step: the call for proposal, every
    bid received, the winner and why, scheduled/started/finished times, resource and outcome."""

    SUBMODEL: Final = _tw("ProcessDocumentation/1/0")
    STEP_RECORD: Final = _tw("ProcessDocumentation/StepRecord/1/0")
    STEP_INDEX: Final = _tw("ProcessDocumentation/StepIndex/1/0")
    CAPABILITY: Final = _tw("ProcessDocumentation/RequiredCapability/1/0")
    CALL_FOR_PROPOSAL_ID: Final = _tw("ProcessDocumentation/CallForProposalId/1/0")
    BIDS: Final = _tw("ProcessDocumentation/Bids/1/0")
    BID: Final = _tw("ProcessDocumentation/Bid/1/0")
    BID_RESOURCE: Final = _tw("ProcessDocumentation/Bid/Resource/1/0")
    BID_START: Final = _tw("ProcessDocumentation/Bid/Start/1/0")
    BID_COMPLETION: Final = _tw("ProcessDocumentation/Bid/Completion/1/0")
    BID_PRICE: Final = _tw("ProcessDocumentation/Bid/Price/1/0")
    BID_SCORE: Final = _tw("ProcessDocumentation/Bid/Score/1/0")
    WINNER: Final = _tw("ProcessDocumentation/Winner/1/0")
    SELECTION_REASON: Final = _tw("ProcessDocumentation/SelectionReason/1/0")
    SELECTION_POLICY: Final = _tw("ProcessDocumentation/SelectionPolicy/1/0")
    SCHEDULED_START: Final = _tw("ProcessDocumentation/ScheduledStart/1/0")
    SCHEDULED_END: Final = _tw("ProcessDocumentation/ScheduledEnd/1/0")
    STARTED: Final = _tw("ProcessDocumentation/Started/1/0")
    FINISHED: Final = _tw("ProcessDocumentation/Finished/1/0")
    RESOURCE: Final = _tw("ProcessDocumentation/Resource/1/0")
    OUTCOME: Final = _tw("ProcessDocumentation/Outcome/1/0")
    OUTCOME_TEXT: Final = _tw("ProcessDocumentation/OutcomeText/1/0")
    RECORDED_AT: Final = _tw("ProcessDocumentation/RecordedAt/1/0")


# ---------------------------------------------------------------------------------------------------------------------
# Our own submodels (no template exists)
# ---------------------------------------------------------------------------------------------------------------------


class Order:
    """The order a vendor placed for a product instance (added on order intake)."""

    SUBMODEL: Final = _tw("Order/1/0")
    ORDER_ID: Final = _tw("Order/OrderId/1/0")
    PRODUCT_TYPE: Final = _tw("Order/ProductType/1/0")
    PRIORITY: Final = _tw("Order/Priority/1/0")  # 1 (top: earliest completion) .. 5 (lowest: cheapest)
    DUE_DATE: Final = _tw("Order/DueDate/1/0")
    RELEASE_TIME: Final = _tw("Order/ReleaseTime/1/0")
    CUSTOMIZATION: Final = _tw("Order/Customization/1/0")
    NOTIFICATION_ENDPOINT: Final = _tw("Order/NotificationEndpoint/1/0")
    VENDOR: Final = _tw("Order/Vendor/1/0")


class ProcessPlan:
    """Ordered manufacturing steps derived from the product type."""

    SUBMODEL: Final = _tw("ProcessPlan/1/0")
    STEPS: Final = _tw("ProcessPlan/Steps/1/0")
    STEP: Final = _tw("ProcessPlan/Step/1/0")
    STEP_INDEX: Final = _tw("ProcessPlan/Step/Index/1/0")
    REQUIRED_CAPABILITY: Final = _tw("ProcessPlan/Step/RequiredCapability/1/0")
    ALTERNATIVES: Final = _tw("ProcessPlan/Step/AlternativeCapabilities/1/0")
    PARAMETERS: Final = _tw("ProcessPlan/Step/Parameters/1/0")
    PARAMETER: Final = _tw("ProcessPlan/Step/Parameter/1/0")


class BiddingParameters:
    """How a resource prices and times its offers."""

    SUBMODEL: Final = _tw("BiddingParameters/1/0")
    COST_RATE: Final = _tw("BiddingParameters/CostRate/1/0")  # money per time unit of processing
    SETUP_COST: Final = _tw("BiddingParameters/SetupCost/1/0")
    SPEED_FACTOR: Final = _tw("BiddingParameters/SpeedFactor/1/0")  # >1 is faster than nominal
    TRANSPORT_SPEED: Final = _tw("BiddingParameters/TransportSpeed/1/0")
    CAPABILITY_RATES: Final = _tw("BiddingParameters/CapabilityRates/1/0")
    CAPABILITY_RATE: Final = _tw("BiddingParameters/CapabilityRate/1/0")
    LOCATION: Final = _tw("BiddingParameters/Location/1/0")
    PROPOSAL_VALIDITY: Final = _tw("BiddingParameters/ProposalValidity/1/0")


class Status:
    """Live state of an agent's asset (resources: queue and current step; products: progress)."""

    SUBMODEL: Final = _tw("Status/1/0")
    STATE: Final = _tw("Status/State/1/0")
    QUEUE_LENGTH: Final = _tw("Status/QueueLength/1/0")
    CURRENT_STEP: Final = _tw("Status/CurrentStep/1/0")
    CURRENT_PRODUCT: Final = _tw("Status/CurrentProduct/1/0")
    LOCATION: Final = _tw("Status/Location/1/0")
    UPDATED_AT: Final = _tw("Status/UpdatedAt/1/0")


class Agent:
    """Ids for the agent behind an AAS (operations it offers on its AAS server)."""

    OPERATION: Final = _tw("Agent/Operation/1/0")
