"""What the analyser knows of the parser's grammar: every node class and every field.

For masked sessions the analyser walks every field of every node of a statement
(DESIGN.md section 2, "closed by construction"). This module is the map it walks by: each
node class pglast can produce is either

* `ALLOWED`, with every one of its fields classified: an expression or clause to walk like a
  read (`EXPR`), a position a handler of the analyser treats itself (`Handled`), relations
  that are named without their values being read (`RELATIONS`), names or aliases only
  (`Names`), or inert data (`Inert`: a flag, a location, a name held as a string);
* `REFUSED`, with the reason a masked role is given (statements masked roles may not run,
  and clauses that only occur in them);
* `NOT_RAW`: produced by parse analysis or the planner, never by the raw parser; refused if
  one is ever met.

The analyser refuses any class that is not `ALLOWED`, any field that is not classified, and
any node found in a field classified as holding none. A unit test enumerates pglast's node
classes and fails when a class or a field is missing here, so a new grammar release cannot
add a position nobody looked at.

`since`: the server version from which the server reads a construct as pglast's grammar
does. pglast may parse a newer grammar than the server runs; text printed from such a node
could mean something else to an older server (`JSON_ARRAY(...)` is a function call to
PostgreSQL 15, possibly a user's), so the analyser refuses it on older servers.

Pure data: no I/O, no analysis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import pglast.keywords


@dataclass(frozen=True)
class Inert:
    """Holds no node: a flag, a number, a location, a name held as a string."""

    reason: str


@dataclass(frozen=True)
class Names:
    """Holds a (possibly qualified) name or a list of names: String nodes, `*`, numbers."""

    reason: str


@dataclass(frozen=True)
class Expr:
    """Holds expressions or clauses: walked, every node in it analysed like a read."""

    reason: str = "walked like a read"


@dataclass(frozen=True)
class Relations:
    """Holds relations (RangeVar) that are named, looked up and recorded, but whose values
    the statement does not read (LOCK, TRUNCATE, a table's parents)."""

    reason: str


@dataclass(frozen=True)
class Handled:
    """A position the analyser's handler `handler` treats itself."""

    handler: str
    reason: str


FieldRule = Inert | Names | Expr | Relations | Handled

LOC: Final = Inert("a position in the statement text")
FLAG: Final = Inert("a flag or an enumeration value set by the grammar")
NAME: Final = Inert("a name held as a string, not evaluated")
VALUE: Final = Inert("a constant as the statement spells it")
ANALYSED: Final = Inert("filled in by parse analysis; absent from a raw parse tree")
QNAME: Final = Names("a possibly qualified name")
COLNAMES: Final = Names("column names")
OPNAME: Final = Names("an operator name; the handler checks it is a built-in operator")
EXPR: Final = Expr()


@dataclass(frozen=True)
class NodeRule:
    fields: MappingProxyType[str, FieldRule]
    since: int = 0  # server_version_num from which the server reads it as pglast does


def _rule(since: int = 0, **fields: FieldRule) -> NodeRule:
    return NodeRule(MappingProxyType(dict(fields)), since)


# ---- allowed node classes ----------------------------------------------------------------

_FROM = "from_item"  # the handler that turns relations in FROM into masking subqueries
_WRITE = "write"

_ALLOWED: dict[str, NodeRule] = {
    # -- constants, names, parameters
    "A_Const": _rule(isnull=FLAG, val=EXPR),
    "Integer": _rule(ival=VALUE),
    "Float": _rule(fval=VALUE),
    "String": _rule(sval=VALUE),
    "Boolean": _rule(boolval=VALUE),
    "BitString": _rule(bsval=VALUE),
    "A_Star": _rule(),
    "ParamRef": _rule(number=VALUE, location=LOC),
    "Alias": _rule(aliasname=NAME, colnames=COLNAMES),
    "ColumnRef": _rule(
        fields=Handled("column_ref", "qualified names, attribute notation"),
        location=LOC,
    ),
    "TypeName": _rule(
        names=QNAME,
        setof=FLAG,
        pct_type=FLAG,
        typmods=EXPR,
        typemod=ANALYSED,
        arrayBounds=EXPR,
        location=LOC,
    ),
    "CollateClause": _rule(arg=EXPR, collname=QNAME, location=LOC),
    "SQLValueFunction": _rule(op=FLAG, typmod=FLAG, location=LOC),
    "SetToDefault": _rule(typeMod=ANALYSED, location=LOC),
    "CurrentOfExpr": _rule(cvarno=ANALYSED, cursor_name=NAME, cursor_param=ANALYSED),
    # -- operators and expressions
    "A_Expr": _rule(
        kind=FLAG,
        name=Handled("operator", "the operator must be a built-in one"),
        lexpr=EXPR,
        rexpr=EXPR,
        rexpr_list_start=LOC,
        rexpr_list_end=LOC,
        location=LOC,
    ),
    "A_ArrayExpr": _rule(elements=EXPR, list_start=LOC, list_end=LOC, location=LOC),
    "A_Indices": _rule(is_slice=FLAG, lidx=EXPR, uidx=EXPR),
    "A_Indirection": _rule(
        arg=EXPR,
        indirection=Handled("indirection", "(x).f may call f(x): checked like a function"),
    ),
    "BoolExpr": _rule(boolop=FLAG, args=EXPR, location=LOC),
    "BooleanTest": _rule(arg=EXPR, booltesttype=FLAG, location=LOC),
    "NullTest": _rule(arg=EXPR, nulltesttype=FLAG, argisrow=ANALYSED, location=LOC),
    "CaseExpr": _rule(arg=EXPR, args=EXPR, defresult=EXPR, location=LOC),
    "CaseWhen": _rule(expr=EXPR, result=EXPR, location=LOC),
    "CoalesceExpr": _rule(args=EXPR, location=LOC),
    "MinMaxExpr": _rule(op=FLAG, args=EXPR, location=LOC),
    "RowExpr": _rule(args=EXPR, row_format=FLAG, colnames=COLNAMES, location=LOC),
    "TypeCast": _rule(arg=EXPR, typeName=EXPR, location=LOC),
    "FuncCall": _rule(
        funcname=Handled("function", "the function must be allowed; built-ins are pinned"),
        args=EXPR,
        agg_order=EXPR,
        agg_filter=EXPR,
        over=EXPR,
        agg_within_group=FLAG,
        agg_star=FLAG,
        agg_distinct=FLAG,
        func_variadic=FLAG,
        funcformat=FLAG,
        location=LOC,
    ),
    "NamedArgExpr": _rule(arg=EXPR, name=NAME, argnumber=ANALYSED, location=LOC),
    "GroupingFunc": _rule(args=EXPR, refs=ANALYSED, agglevelsup=ANALYSED, location=LOC),
    "GroupingSet": _rule(kind=FLAG, content=EXPR, location=LOC),
    "SubLink": _rule(
        subLinkType=FLAG,
        subLinkId=ANALYSED,
        testexpr=EXPR,
        operName=Handled("sublink", "the comparison operator must be a built-in one"),
        subselect=EXPR,
        location=LOC,
    ),
    "MultiAssignRef": _rule(source=EXPR, colno=FLAG, ncolumns=FLAG),
    "SortBy": _rule(
        node=EXPR,
        sortby_dir=FLAG,
        sortby_nulls=FLAG,
        useOp=Handled("sort_by", "ORDER BY ... USING: the operator must be a built-in one"),
        location=LOC,
    ),
    "WindowDef": _rule(
        name=NAME,
        refname=NAME,
        partitionClause=EXPR,
        orderClause=EXPR,
        frameOptions=FLAG,
        startOffset=EXPR,
        endOffset=EXPR,
        location=LOC,
    ),
    "XmlExpr": _rule(
        op=FLAG,
        name=NAME,
        named_args=EXPR,
        arg_names=ANALYSED,
        args=EXPR,
        xmloption=FLAG,
        indent=FLAG,
        typmod=ANALYSED,
        location=LOC,
    ),
    "XmlSerialize": _rule(xmloption=FLAG, expr=EXPR, typeName=EXPR, indent=FLAG, location=LOC),
    "ResTarget": _rule(name=NAME, indirection=EXPR, val=EXPR, location=LOC),
    # -- SQL/JSON (PostgreSQL 16 and 17 syntax; function calls to older servers)
    "JsonFormat": _rule(160000, format_type=FLAG, encoding=FLAG, location=LOC),
    "JsonReturning": _rule(160000, format=EXPR, typmod=ANALYSED),
    "JsonOutput": _rule(160000, typeName=EXPR, returning=EXPR),
    "JsonValueExpr": _rule(160000, raw_expr=EXPR, formatted_expr=ANALYSED, format=EXPR),
    "JsonKeyValue": _rule(160000, key=EXPR, value=EXPR),
    "JsonObjectConstructor": _rule(
        160000, exprs=EXPR, output=EXPR, absent_on_null=FLAG, unique=FLAG, location=LOC
    ),
    "JsonArrayConstructor": _rule(
        160000, exprs=EXPR, output=EXPR, absent_on_null=FLAG, location=LOC
    ),
    "JsonArrayQueryConstructor": _rule(
        160000, query=EXPR, output=EXPR, format=EXPR, absent_on_null=FLAG, location=LOC
    ),
    "JsonAggConstructor": _rule(
        160000, output=EXPR, agg_filter=EXPR, agg_order=EXPR, over=EXPR, location=LOC
    ),
    "JsonObjectAgg": _rule(160000, constructor=EXPR, arg=EXPR, absent_on_null=FLAG, unique=FLAG),
    "JsonArrayAgg": _rule(160000, constructor=EXPR, arg=EXPR, absent_on_null=FLAG),
    "JsonIsPredicate": _rule(
        160000, expr=EXPR, format=EXPR, item_type=FLAG, unique_keys=FLAG, location=LOC
    ),
    "JsonParseExpr": _rule(170000, expr=EXPR, output=EXPR, unique_keys=FLAG, location=LOC),
    "JsonScalarExpr": _rule(170000, expr=EXPR, output=EXPR, location=LOC),
    "JsonSerializeExpr": _rule(170000, expr=EXPR, output=EXPR, location=LOC),
    "JsonBehavior": _rule(170000, btype=FLAG, expr=EXPR, coerce=ANALYSED, location=LOC),
    "JsonArgument": _rule(170000, val=EXPR, name=NAME),
    "JsonFuncExpr": _rule(
        170000,
        op=FLAG,
        column_name=NAME,
        context_item=EXPR,
        pathspec=EXPR,
        passing=EXPR,
        output=EXPR,
        on_empty=EXPR,
        on_error=EXPR,
        wrapper=FLAG,
        quotes=FLAG,
        location=LOC,
    ),
    "JsonTablePathSpec": _rule(170000, string=EXPR, name=NAME, name_location=LOC, location=LOC),
    "JsonTableColumn": _rule(
        170000,
        coltype=FLAG,
        name=NAME,
        typeName=EXPR,
        pathspec=EXPR,
        format=EXPR,
        wrapper=FLAG,
        quotes=FLAG,
        columns=EXPR,
        on_empty=EXPR,
        on_error=EXPR,
        location=LOC,
    ),
    # -- FROM items: reached through the read rewrite only
    "RangeVar": _rule(
        catalogname=NAME,
        schemaname=NAME,
        relname=NAME,
        inh=FLAG,
        relpersistence=FLAG,
        alias=EXPR,
        location=LOC,
    ),
    "JoinExpr": _rule(
        jointype=FLAG,
        isNatural=FLAG,
        larg=Handled(_FROM, "a FROM item"),
        rarg=Handled(_FROM, "a FROM item"),
        usingClause=COLNAMES,
        join_using_alias=EXPR,
        quals=EXPR,
        alias=EXPR,
        rtindex=ANALYSED,
    ),
    "RangeSubselect": _rule(
        lateral=FLAG, subquery=Handled(_FROM, "a subquery in FROM"), alias=EXPR
    ),
    "RangeFunction": _rule(
        lateral=FLAG,
        ordinality=FLAG,
        is_rowsfrom=FLAG,
        functions=EXPR,
        alias=EXPR,
        coldeflist=EXPR,
    ),
    "RangeTableSample": _rule(
        relation=Handled(_FROM, "the sampled relation, masked like any FROM item"),
        method=QNAME,
        args=EXPR,
        repeatable=EXPR,
        location=LOC,
    ),
    "RangeTableFunc": _rule(
        lateral=FLAG,
        docexpr=EXPR,
        rowexpr=EXPR,
        namespaces=EXPR,
        columns=EXPR,
        alias=EXPR,
        location=LOC,
    ),
    "RangeTableFuncCol": _rule(
        colname=NAME,
        typeName=EXPR,
        for_ordinality=FLAG,
        is_not_null=FLAG,
        colexpr=EXPR,
        coldefexpr=EXPR,
        location=LOC,
    ),
    "JsonTable": _rule(
        170000,
        context_item=EXPR,
        pathspec=EXPR,
        passing=EXPR,
        columns=EXPR,
        on_error=EXPR,
        alias=EXPR,
        lateral=FLAG,
        location=LOC,
    ),
    # -- clauses of queries
    "WithClause": _rule(
        ctes=Handled("with_clause", "CTEs, rewritten with PostgreSQL's scoping"),
        recursive=FLAG,
        location=LOC,
    ),
    "CommonTableExpr": _rule(
        ctename=NAME,
        aliascolnames=COLNAMES,
        ctematerialized=FLAG,
        ctequery=Handled("with_clause", "the CTE's statement"),
        search_clause=EXPR,
        cycle_clause=EXPR,
        location=LOC,
        cterecursive=ANALYSED,
        cterefcount=ANALYSED,
        ctecolnames=ANALYSED,
        ctecoltypes=ANALYSED,
        ctecoltypmods=ANALYSED,
        ctecolcollations=ANALYSED,
    ),
    "CTESearchClause": _rule(
        search_col_list=COLNAMES, search_breadth_first=FLAG, search_seq_column=NAME, location=LOC
    ),
    "CTECycleClause": _rule(
        cycle_col_list=COLNAMES,
        cycle_mark_column=NAME,
        cycle_mark_value=EXPR,
        cycle_mark_default=EXPR,
        cycle_path_column=NAME,
        location=LOC,
        cycle_mark_typmod=ANALYSED,
    ),
    "LockingClause": _rule(
        lockedRels=Handled("locking_clause", "FOR UPDATE OF: names of FROM items"),
        strength=FLAG,
        waitPolicy=FLAG,
    ),
    "IntoClause": _rule(
        rel=Handled("into_clause", "the relation SELECT INTO / CREATE TABLE AS creates"),
        colNames=COLNAMES,
        accessMethod=NAME,
        options=EXPR,
        onCommit=FLAG,
        tableSpaceName=NAME,
        viewQuery=ANALYSED,
        skipData=FLAG,
    ),
    "DefElem": _rule(
        defnamespace=NAME,
        defname=NAME,
        arg=EXPR,
        defaction=FLAG,
        location=LOC,
        arg_location=LOC,
    ),
    # -- clauses of writes
    "OnConflictClause": _rule(
        action=FLAG,
        infer=EXPR,
        targetList=Handled(_WRITE, "ON CONFLICT DO UPDATE SET: assignments to the target"),
        whereClause=Handled(_WRITE, "reads the target row: masked"),
        location=LOC,
    ),
    "InferClause": _rule(indexElems=EXPR, whereClause=EXPR, conname=NAME, location=LOC),
    "IndexElem": _rule(
        name=NAME,
        expr=EXPR,
        indexcolname=NAME,
        collation=QNAME,
        opclass=QNAME,
        opclassopts=EXPR,
        ordering=FLAG,
        nulls_ordering=FLAG,
    ),
    "ReturningClause": _rule(
        options=Handled(_WRITE, "RETURNING WITH (OLD/NEW AS ...): PostgreSQL 18 aliases"),
        exprs=Handled(_WRITE, "RETURNING reads the target row: masked"),
    ),
    # -- table definitions (CREATE TABLE of the session's own tables)
    "ColumnDef": _rule(
        colname=NAME,
        typeName=EXPR,
        compression=NAME,
        inhcount=ANALYSED,
        is_local=ANALYSED,
        is_not_null=FLAG,
        is_from_type=ANALYSED,
        storage=FLAG,
        storage_name=NAME,
        raw_default=EXPR,
        cooked_default=ANALYSED,
        identity=FLAG,
        identitySequence=ANALYSED,
        generated=FLAG,
        collClause=EXPR,
        constraints=EXPR,
        fdwoptions=EXPR,
        location=LOC,
    ),
    "Constraint": _rule(
        contype=FLAG,
        conname=NAME,
        deferrable=FLAG,
        initdeferred=FLAG,
        is_enforced=FLAG,
        skip_validation=FLAG,
        initially_valid=FLAG,
        is_no_inherit=FLAG,
        raw_expr=EXPR,
        cooked_expr=ANALYSED,
        generated_when=FLAG,
        generated_kind=FLAG,
        nulls_not_distinct=FLAG,
        keys=COLNAMES,
        without_overlaps=FLAG,
        including=COLNAMES,
        exclusions=Handled("constraint", "EXCLUDE: index elements and their operators"),
        options=EXPR,
        indexname=NAME,
        indexspace=NAME,
        reset_default_tblspc=FLAG,
        access_method=NAME,
        where_clause=EXPR,
        pktable=Handled("constraint", "REFERENCES: a foreign key can confirm key values"),
        fk_attrs=COLNAMES,
        pk_attrs=COLNAMES,
        fk_with_period=FLAG,
        pk_with_period=FLAG,
        fk_matchtype=FLAG,
        fk_upd_action=FLAG,
        fk_del_action=FLAG,
        fk_del_set_cols=COLNAMES,
        old_conpfeqop=ANALYSED,
        location=LOC,
    ),
    "TableLikeClause": _rule(
        relation=Relations("LIKE copies a table's definition, not its rows"), options=FLAG
    ),
    "PartitionBoundSpec": _rule(
        strategy=FLAG,
        is_default=FLAG,
        modulus=VALUE,
        remainder=VALUE,
        listdatums=EXPR,
        lowerdatums=EXPR,
        upperdatums=EXPR,
        location=LOC,
    ),
    "PartitionSpec": _rule(strategy=FLAG, partParams=EXPR, location=LOC),
    "PartitionElem": _rule(name=NAME, expr=EXPR, collation=QNAME, opclass=QNAME, location=LOC),
    "ObjectWithArgs": _rule(objname=QNAME, objargs=EXPR, objfuncargs=EXPR, args_unspecified=FLAG),
    "FunctionParameter": _rule(name=NAME, argType=EXPR, mode=FLAG, defexpr=EXPR, location=LOC),
    # -- statements masked roles may run
    "RawStmt": _rule(stmt=Handled("statement", "the statement"), stmt_location=LOC, stmt_len=LOC),
    "SelectStmt": _rule(
        distinctClause=EXPR,
        intoClause=Handled("select", "SELECT INTO creates a table"),
        targetList=EXPR,
        fromClause=Handled(_FROM, "FROM items become masking subqueries"),
        whereClause=EXPR,
        groupClause=EXPR,
        groupDistinct=FLAG,
        havingClause=EXPR,
        windowClause=EXPR,
        valuesLists=EXPR,
        sortClause=EXPR,
        limitOffset=EXPR,
        limitCount=EXPR,
        limitOption=FLAG,
        lockingClause=EXPR,
        withClause=Handled("with_clause", "CTEs are in scope for the whole statement"),
        op=FLAG,
        all=FLAG,
        larg=Handled("select", "a branch of a set operation"),
        rarg=Handled("select", "a branch of a set operation"),
    ),
    "InsertStmt": _rule(
        relation=Handled(_WRITE, "the write target"),
        cols=Handled(_WRITE, "assignment targets; their subscripts are new values"),
        selectStmt=Handled(_WRITE, "the new rows: must not read personal columns"),
        onConflictClause=Handled(_WRITE, "ON CONFLICT"),
        returningClause=Handled(_WRITE, "RETURNING"),
        withClause=Handled("with_clause", "CTEs"),
        override=FLAG,
    ),
    "UpdateStmt": _rule(
        relation=Handled(_WRITE, "the write target"),
        targetList=Handled(_WRITE, "assignments: new values and target subscripts"),
        whereClause=Handled(_WRITE, "reads the target row: masked"),
        fromClause=Handled(_FROM, "FROM items become masking subqueries"),
        returningClause=Handled(_WRITE, "RETURNING"),
        withClause=Handled("with_clause", "CTEs"),
    ),
    "DeleteStmt": _rule(
        relation=Handled(_WRITE, "the write target"),
        usingClause=Handled(_FROM, "USING items become masking subqueries"),
        whereClause=Handled(_WRITE, "reads the target row: masked"),
        returningClause=Handled(_WRITE, "RETURNING"),
        withClause=Handled("with_clause", "CTEs"),
    ),
    "CopyStmt": _rule(
        relation=Handled("copy", "COPY t TO becomes COPY (SELECT ...) TO"),
        query=Handled("copy", "COPY (query) TO"),
        attlist=COLNAMES,
        is_from=FLAG,
        is_program=FLAG,
        filename=Handled("copy", "server files and programs are refused"),
        options=EXPR,
        whereClause=EXPR,
    ),
    "ExplainStmt": _rule(query=Handled("explain", "the explained statement"), options=EXPR),
    "PrepareStmt": _rule(
        name=NAME, argtypes=EXPR, query=Handled("nested_query", "the prepared statement")
    ),
    "ExecuteStmt": _rule(name=NAME, params=EXPR),
    "DeallocateStmt": _rule(name=NAME, isall=FLAG, location=LOC),
    "DeclareCursorStmt": _rule(
        portalname=NAME, options=FLAG, query=Handled("nested_query", "the cursor's query")
    ),
    "FetchStmt": _rule(direction=FLAG, howMany=VALUE, portalname=NAME, ismove=FLAG),
    "ClosePortalStmt": _rule(portalname=NAME),
    "CreateTableAsStmt": _rule(
        query=Handled("nested_query", "the query whose rows fill the new table"),
        into=Handled("nested_query", "the new table"),
        objtype=FLAG,
        is_select_into=FLAG,
        if_not_exists=FLAG,
    ),
    "ViewStmt": _rule(
        view=Handled("nested_query", "the view it creates"),
        aliases=COLNAMES,
        query=Handled("nested_query", "the view's query"),
        replace=FLAG,
        options=EXPR,
        withCheckOption=FLAG,
    ),
    "VariableSetStmt": _rule(
        kind=FLAG,
        name=Handled("variable_set", "settings that change identity or parsing are refused"),
        args=EXPR,
        jumble_args=FLAG,
        is_local=FLAG,
        location=LOC,
    ),
    "VariableShowStmt": _rule(name=NAME),
    "TransactionStmt": _rule(
        kind=FLAG, options=EXPR, savepoint_name=NAME, gid=NAME, chain=FLAG, location=LOC
    ),
    "CallStmt": _rule(funccall=EXPR, funcexpr=ANALYSED, outargs=ANALYSED),
    "ListenStmt": _rule(conditionname=NAME),
    "UnlistenStmt": _rule(conditionname=NAME),
    "NotifyStmt": _rule(conditionname=NAME, payload=VALUE, payload_location=LOC),
    "DiscardStmt": _rule(target=FLAG),
    "LockStmt": _rule(
        relations=Relations("LOCK takes locks; it reads no values"), mode=FLAG, nowait=FLAG
    ),
    "TruncateStmt": _rule(
        relations=Relations("TRUNCATE removes rows; it reads no values"),
        restart_seqs=FLAG,
        behavior=FLAG,
    ),
    "CheckPointStmt": _rule(),
    # VACUUM and ANALYZE return no values; VERBOSE's messages hold names and counts. Code
    # they run (index and statistics expressions) is table code, as a write's is (see
    # README, "Rules checked against the database"); its messages are scrubbed as any.
    "VacuumStmt": _rule(options=EXPR, rels=EXPR, is_vacuumcmd=FLAG),
    "VacuumRelation": _rule(
        relation=Relations("VACUUM and ANALYZE read no values for the client"),
        va_cols=COLNAMES,
    ),
    "CreateStmt": _rule(
        relation=Handled("create_table", "the table it creates"),
        tableElts=EXPR,
        inhRelations=Relations("parents: their definition, not their rows"),
        partbound=EXPR,
        partspec=EXPR,
        ofTypename=EXPR,
        constraints=EXPR,
        nnconstraints=ANALYSED,
        options=EXPR,
        oncommit=FLAG,
        tablespacename=NAME,
        accessMethod=NAME,
        if_not_exists=FLAG,
    ),
    "DropStmt": _rule(
        objects=EXPR,
        removeType=FLAG,
        behavior=FLAG,
        missing_ok=FLAG,
        concurrent=FLAG,
    ),
    "ConstraintsSetStmt": _rule(
        constraints=Handled("constraints_set", "constraint names"), deferred=FLAG
    ),
}

ALLOWED: Final = MappingProxyType(_ALLOWED)


# ---- refused: statements masked roles may not run, and what only occurs in them ----------

_NOT_ALLOWED = "is not allowed for masked roles"

# The SQL a statement class stands for, as a masked role is told it may not run it.
STATEMENT_SQL: Final = MappingProxyType(
    {
        "AlterCollationStmt": "ALTER COLLATION",
        "AlterDatabaseRefreshCollStmt": "ALTER DATABASE",
        "AlterDatabaseSetStmt": "ALTER DATABASE",
        "AlterDatabaseStmt": "ALTER DATABASE",
        "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
        "AlterDomainStmt": "ALTER DOMAIN",
        "AlterEnumStmt": "ALTER TYPE",
        "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
        "AlterExtensionContentsStmt": "ALTER EXTENSION",
        "AlterExtensionStmt": "ALTER EXTENSION",
        "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER",
        "AlterForeignServerStmt": "ALTER SERVER",
        "AlterFunctionStmt": "ALTER FUNCTION",
        "AlterObjectDependsStmt": "ALTER ... DEPENDS ON EXTENSION",
        "AlterObjectSchemaStmt": "ALTER ... SET SCHEMA",
        "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY",
        "AlterOperatorStmt": "ALTER OPERATOR",
        "AlterOwnerStmt": "ALTER ... OWNER TO",
        "AlterPolicyStmt": "ALTER POLICY",
        "AlterPublicationStmt": "ALTER PUBLICATION",
        "AlterRoleSetStmt": "ALTER ROLE ... SET",
        "AlterRoleStmt": "ALTER ROLE",
        "AlterSeqStmt": "ALTER SEQUENCE",
        "AlterStatsStmt": "ALTER STATISTICS",
        "AlterSubscriptionStmt": "ALTER SUBSCRIPTION",
        "AlterSystemStmt": "ALTER SYSTEM",
        "AlterTSConfigurationStmt": "ALTER TEXT SEARCH CONFIGURATION",
        "AlterTSDictionaryStmt": "ALTER TEXT SEARCH DICTIONARY",
        "AlterTableMoveAllStmt": "ALTER TABLE ALL IN TABLESPACE",
        "AlterTableSpaceOptionsStmt": "ALTER TABLESPACE",
        "AlterTableStmt": "ALTER TABLE",
        "AlterTypeStmt": "ALTER TYPE",
        "AlterUserMappingStmt": "ALTER USER MAPPING",
        "ClusterStmt": "CLUSTER",
        "CommentStmt": "COMMENT",
        "CompositeTypeStmt": "CREATE TYPE",
        "CreateAmStmt": "CREATE ACCESS METHOD",
        "CreateCastStmt": "CREATE CAST",
        "CreateConversionStmt": "CREATE CONVERSION",
        "CreateDomainStmt": "CREATE DOMAIN",
        "CreateEnumStmt": "CREATE TYPE",
        "CreateEventTrigStmt": "CREATE EVENT TRIGGER",
        "CreateExtensionStmt": "CREATE EXTENSION",
        "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER",
        "CreateForeignServerStmt": "CREATE SERVER",
        "CreateForeignTableStmt": "CREATE FOREIGN TABLE",
        "CreateFunctionStmt": "CREATE FUNCTION",
        "CreateOpClassStmt": "CREATE OPERATOR CLASS",
        "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
        "CreatePLangStmt": "CREATE LANGUAGE",
        "CreatePolicyStmt": "CREATE POLICY",
        "CreatePublicationStmt": "CREATE PUBLICATION",
        "CreateRangeStmt": "CREATE TYPE",
        "CreateRoleStmt": "CREATE ROLE",
        "CreateSchemaStmt": "CREATE SCHEMA",
        "CreateSeqStmt": "CREATE SEQUENCE",
        "CreateStatsStmt": "CREATE STATISTICS",
        "CreateSubscriptionStmt": "CREATE SUBSCRIPTION",
        "CreateTableSpaceStmt": "CREATE TABLESPACE",
        "CreateTransformStmt": "CREATE TRANSFORM",
        "CreateTrigStmt": "CREATE TRIGGER",
        "CreateUserMappingStmt": "CREATE USER MAPPING",
        "CreatedbStmt": "CREATE DATABASE",
        "DefineStmt": "CREATE AGGREGATE, OPERATOR, TYPE or COLLATION",
        "DoStmt": "DO",
        "DropOwnedStmt": "DROP OWNED",
        "DropRoleStmt": "DROP ROLE",
        "DropSubscriptionStmt": "DROP SUBSCRIPTION",
        "DropTableSpaceStmt": "DROP TABLESPACE",
        "DropUserMappingStmt": "DROP USER MAPPING",
        "DropdbStmt": "DROP DATABASE",
        "GrantRoleStmt": "GRANT or REVOKE of a role",
        "GrantStmt": "GRANT or REVOKE",
        "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA",
        "IndexStmt": "CREATE INDEX",
        "LoadStmt": "LOAD",
        "MergeStmt": "MERGE",
        "PLAssignStmt": "a PL/pgSQL assignment",
        "ReassignOwnedStmt": "REASSIGN OWNED",
        "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
        "ReindexStmt": "REINDEX",
        "RenameStmt": "ALTER ... RENAME",
        "ReplicaIdentityStmt": "ALTER TABLE ... REPLICA IDENTITY",
        "ReturnStmt": "RETURN",
        "RuleStmt": "CREATE RULE",
        "SecLabelStmt": "SECURITY LABEL",
    }
)

_SPECIFIC: dict[str, str] = {
    "DoStmt": "DO blocks are not allowed for masked roles",
    "MergeStmt": "MERGE is not supported for masked roles",
    "CreateFunctionStmt": "CREATE FUNCTION is not allowed for masked roles: a function's "
    "body runs SQL pgveil does not see",
}

# Nodes that only occur inside statements refused above.
_INSIDE_REFUSED: dict[str, str] = {
    "AccessPriv": "GRANT",
    "AlterTableCmd": "ALTER TABLE",
    "ATAlterConstraint": "ALTER TABLE",
    "CreateOpClassItem": "CREATE OPERATOR CLASS",
    "MergeWhenClause": "MERGE",
    "MergeSupportFunc": "MERGE",
    "PartitionCmd": "ALTER TABLE ... ATTACH PARTITION",
    "PublicationObjSpec": "CREATE PUBLICATION",
    "PublicationTable": "CREATE PUBLICATION",
    "ReturningOption": "RETURNING WITH (OLD/NEW AS ...)",
    "RoleSpec": "statements on roles",
    "StatsElem": "CREATE STATISTICS",
    "TriggerTransition": "CREATE TRIGGER",
}

REFUSED: Final = MappingProxyType(
    {
        **{cls: _SPECIFIC.get(cls, f"{sql} {_NOT_ALLOWED}") for cls, sql in STATEMENT_SQL.items()},
        **{cls: f"{sql} {_NOT_ALLOWED}" for cls, sql in _INSIDE_REFUSED.items()},
    }
)

# ---- never in a raw parse tree -----------------------------------------------------------

_ANALYSIS = "built by parse analysis or the planner"
_ANALYSED_CLASSES = (
    "Aggref", "AlternativeSubPlan", "ArrayCoerceExpr", "ArrayExpr", "CallContext",
    "CaseTestExpr", "CoerceToDomain", "CoerceToDomainValue", "CoerceViaIO",
    "CollateExpr", "ConvertRowtypeExpr", "FieldSelect", "FieldStore", "FromExpr",
    "FuncExpr", "InferenceElem", "InlineCodeBlock", "JsonConstructorExpr", "JsonExpr",
    "MergeAction", "OnConflictExpr", "OpExpr", "Param", "PartitionRangeDatum", "Query",
    "RTEPermissionInfo", "RangeTblEntry", "RangeTblFunction", "RangeTblRef",
    "RelabelType", "ReturningExpr", "RowCompareExpr", "RowMarkClause",
    "ScalarArrayOpExpr", "SetOperationStmt", "SortGroupClause", "SubPlan",
    "SubscriptingRef", "TableFunc", "TableSampleClause", "TargetEntry", "Var",
    "WindowClause", "WindowFunc", "WindowFuncRunCondition", "WithCheckOption",
)  # fmt: skip
NOT_RAW: Final = MappingProxyType(
    {cls: _ANALYSIS for cls in _ANALYSED_CLASSES}
    | {
        "Expr": "the abstract base of expression nodes",
        "ValUnion": "pglast's stand-in for A_Const's value union; A_Const holds the value node",
    }
)


def refusal_reason(cls: str) -> str:
    """What a masked role is told when a statement holds a node of class `cls`."""
    reason = REFUSED.get(cls)
    if reason is not None:
        return reason
    # NOT_RAW, or a class newer than this table: never guessed at
    return f"pgveil cannot analyse {cls} nodes; the statement is refused"


# ---- keywords ------------------------------------------------------------------------------

_PARSER_KEYWORDS: Final = MappingProxyType(
    {
        **{w: "U" for w in pglast.keywords.UNRESERVED_KEYWORDS},
        **{w: "C" for w in pglast.keywords.COL_NAME_KEYWORDS},
        **{w: "T" for w in pglast.keywords.TYPE_FUNC_NAME_KEYWORDS},
        **{w: "R" for w in pglast.keywords.RESERVED_KEYWORDS},
    }
)


def misread_words(server: Mapping[str, str]) -> frozenset[str]:
    """Words the server and pglast read differently wherever they stand: reserved by one
    of them and not by the other (SYSTEM_USER is reserved syntax from PostgreSQL 16 on, a
    plain identifier to PostgreSQL 15), or a keyword of the server's that pglast takes for
    an identifier (a server newer than pglast's grammar). Words that are keywords of pglast
    only but not reserved (`json`, ...) are identifiers to both wherever pglast builds an
    ordinary node; where it builds syntax of its own (SQL/JSON), `since` refuses the node.

    `server`: pg_get_keywords() as word -> category (U, C, T, R); empty when unknown."""
    if not server:
        return frozenset()
    out = set()
    for word in set(_PARSER_KEYWORDS) | set(server):
        ours, theirs = _PARSER_KEYWORDS.get(word), server.get(word)
        if (ours == "R") != (theirs == "R") or (theirs in ("C", "T", "R") and ours in (None, "U")):
            out.add(word)
    return frozenset(out)
