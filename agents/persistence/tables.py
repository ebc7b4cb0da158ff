"""The run database: one table per kind of state, each row owned by one agent.

Rows are keyed by the owning agent's short name first, so agents never write each
other's rows and a restarted agent loads exactly what is its own. Snapshots of the
bidding machines are stored as JSON: the machines define their own state.
"""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

# 2: epoch-ms columns BIGINT (PostgreSQL); 3: tb_agent.published_seq; 4: see ANALYSIS_INDEXES; 5: tb_product.selection;
# 6: tb_run and a run_id column in every table (one run per record)
SCHEMA_VERSION = 6

#: Indexes nothing reads while the plant runs, on the tables every message writes (inbox, outbox,
#: machine snapshots): keeping them up to date cost a fifth of those rows' writing (random keys
#: into three more B-trees). They are dropped when a run starts and built when it ends, for the
#: researchers' queries by conversation. (name, table, columns)
ANALYSIS_INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ix_tb_inbox_conversation_id", "tb_inbox", ("conversation_id",)),
    ("ix_tb_outbox_conversation_id", "tb_outbox", ("conversation_id",)),
    ("ix_tb_conversation_conversation_id", "tb_conversation", ("conversation_id",)),
)


class RunStamped(SQLModel):
    """A row of one run: every table of the record carries the id of the run that wrote it, so
    a row can always be told apart from another run's (the database holds one run: tb_run). The
    journal and :meth:`Database.session` stamp it; a row written outside a run keeps ``""``."""

    run_id: str = Field(default="", sa_column_kwargs={"server_default": ""})


class RunRecord(SQLModel, table=True):
    """The run this database records: one row (``agents.persistence.runs`` refuses a second)."""

    __tablename__ = "tb_run"
    run_id: str = Field(primary_key=True)
    scenario: str
    started_wall_ms: int = Field(sa_type=BigInteger)
    status: str = "running"  # running | ended (a resumed run is running again)
    resumes: int = 0


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "tb_schema_version"
    id: int = Field(default=1, primary_key=True)
    version: int


class InboxRecord(RunStamped, table=True):
    """Every message an agent received, recorded before it is acted on (idempotency by messageId)."""

    __tablename__ = "tb_inbox"
    agent: str = Field(primary_key=True)
    message_id: str = Field(primary_key=True)
    conversation_id: str  # indexed for analysis once the run is over (ANALYSIS_INDEXES)
    type: str
    sender: str
    topic: str
    received_wall_ms: int = Field(sa_type=BigInteger)
    received_sim: float
    # "" for a message of one of the plant's own agents: it is its sender's outbox row (same
    # message_id) and a line of the recording; a message from outside the plant is kept here whole
    payload: str


class OutboxRecord(RunStamped, table=True):
    """Every message an agent decided to send, written before it is published."""

    __tablename__ = "tb_outbox"
    agent: str = Field(primary_key=True)
    message_id: str = Field(primary_key=True)
    seq: int  # publication order within the agent
    conversation_id: str  # indexed for analysis once the run is over (ANALYSIS_INDEXES)
    type: str
    topic: str
    created_wall_ms: int = Field(sa_type=BigInteger)
    created_sim: float
    payload: str
    published: bool = False


class ConversationRecord(RunStamped, table=True):
    """The snapshot of one bidding state machine (requester per step, provider per call)."""

    __tablename__ = "tb_conversation"
    agent: str = Field(primary_key=True)
    key: str = Field(primary_key=True)  # requester: conversation id; provider: call (cfp) id
    role: str  # "requester" | "provider"
    conversation_id: str  # indexed for analysis once the run is over (ANALYSIS_INDEXES)
    state: str
    terminal: bool = False
    snapshot: str
    updated_sim: float


class ProductRecord(RunStamped, table=True):
    """A product instance: its order, where it stands, and its AAS (JSON) for recovery."""

    __tablename__ = "tb_product"
    product: str = Field(primary_key=True)
    aas_id: str
    product_type: str
    priority: int
    release: float
    due: float | None = None
    vendor: str | None = None
    location: str
    status: str  # accepted | running | completed | failed
    reason: str = ""
    accepted_sim: float
    completed_sim: float | None = None
    ready_at: float = 0.0  # when the product is free for its next step (last step's end)
    selection: str | None = None  # its selection policy, kept so a restart ranks alike (None: the default)
    shell: str  # the product's AAS environment as AAS JSON


class StepRecord(RunStamped, table=True):
    """One manufacturing step of one product, as the product twin sees it."""

    __tablename__ = "tb_step"
    product: str = Field(primary_key=True)
    step: int = Field(primary_key=True)
    capability: str
    status: str  # pending | negotiating | scheduled | done | failed
    conversation_id: str | None = None
    resource: str | None = None
    rounds: int = 0
    cfp_sim: float | None = None
    scheduled_start: float | None = None
    scheduled_end: float | None = None
    started: float | None = None
    finished: float | None = None
    price: float | None = None
    reason: str = ""


class DocumentationRecord(RunStamped, table=True):
    """Mirror of one step's entry in the product's ProcessDocumentation submodel (AAS JSON)."""

    __tablename__ = "tb_documentation"
    product: str = Field(primary_key=True)
    step: int = Field(primary_key=True)
    part: str = Field(primary_key=True)  # "bidding" (by the product) | "execution" (by the resource)
    author: str
    element: str  # the SubmodelElementCollection as AAS JSON
    writes: int = 1  # how many writes reached it (idempotent PUTs may repeat)


class WorkOrderRecord(RunStamped, table=True):
    """A resource's hold or work order for one step."""

    __tablename__ = "tb_work_order"
    resource: str = Field(primary_key=True)
    job_id: str = Field(primary_key=True)  # "<product>/<step>/<cfp id>"
    product: str = Field(index=True)
    step: int
    conversation_id: str
    cfp_id: str
    capability: str
    state: str  # held | booked | running | done | failed | released
    ready: float  # earliest instant the product can be here
    start: float
    end: float
    setup: float
    duration: float
    transport: float
    price: float
    product_aas: str
    priority: int
    params: str = "{}"
    started: float | None = None
    finished: float | None = None


class EventRecord(RunStamped, table=True):
    """Progress events (accepted, step scheduled/completed, completed, failed)."""

    __tablename__ = "tb_event"
    id: int | None = Field(default=None, primary_key=True)
    agent: str = Field(index=True)
    kind: str
    product: str | None = Field(default=None, index=True)
    step: int | None = None
    sim: float
    wall_ms: int = Field(sa_type=BigInteger)
    data: str = "{}"


class NoteRecord(RunStamped, table=True):
    """Protocol notes for researchers: late, duplicate, rejected, not understood, expired..."""

    __tablename__ = "tb_note"
    id: int | None = Field(default=None, primary_key=True)
    agent: str = Field(index=True)
    kind: str = Field(index=True)
    detail: str
    message_id: str | None = None
    sim: float
    wall_ms: int = Field(sa_type=BigInteger)


class AgentRecord(RunStamped, table=True):
    """Which agents exist in the run, of which kind, and whether they finished."""

    __tablename__ = "tb_agent"
    name: str = Field(primary_key=True)
    kind: str
    aas_id: str
    status: str = "running"
    started_wall_ms: int = Field(default=0, sa_type=BigInteger)
    restarts: int = 0
    #: every outbox row of the agent up to this seq was acknowledged by the broker: one small
    #: update per acknowledged batch instead of rewriting each message's row (schema v3)
    published_seq: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
