"""The ClickHouse functions analytics SQL refuses: a deny-list, and why not an allow-list.

The data a query may reach is bounded by the tables, not the functions: every table is
rewritten into a subquery with the tenant filter (``guard``).  Most of ClickHouse's
~1,600 functions only compute on the values they are given, and an allow-list of them
would either be long and hand-kept or refuse the date, string, array and aggregate
functions analytics needs.  So the list is of the functions that reach *past* the rows
they are given: other tables (``joinGet``, dictionaries, ``IN`` called as a function),
the host's files (``file`` reads one even with ``readonly=1``: verified on chDB 26.9),
the server and session (settings, users, hosts, disks), external models and AI
providers, and a few that only burn the shared engine (``sleep``).  Whole categories of
``system.functions`` are denied, and a test checks that every function of those
categories in the running engine is in this list, so an engine upgrade that adds one
fails the test rather than opening a door.  Names compare case-insensitively, as
ClickHouse resolves many functions.
"""

from __future__ import annotations

DENIED_CATEGORIES = (
    "AI",
    "Dictionary",
    "Embedded Dictionary",
    "Introspection",
    "Internal",
    "Machine Learning",
)
"""``system.functions.categories`` whose every function is refused."""

_BY_CATEGORY = """
aiClassify aiEmbed aiExtract aiFilter aiGenerate aiRedact aiSimilarity aiTranslate
AIClassify AIEmbed AIExtract AIFilter AIGenerate AIRedact AISimilarity AITranslate
dictGet dictGetAll dictGetChildren dictGetDate dictGetDateOrDefault dictGetDateTime
dictGetDateTimeOrDefault dictGetDescendants dictGetFloat32 dictGetFloat32OrDefault
dictGetFloat64 dictGetFloat64OrDefault dictGetHierarchy dictGetInt16 dictGetInt16OrDefault
dictGetInt32 dictGetInt32OrDefault dictGetInt64 dictGetInt64OrDefault dictGetInt8
dictGetInt8OrDefault dictGetIPv4 dictGetIPv4OrDefault dictGetIPv6 dictGetIPv6OrDefault
dictGetKeys dictGetOrDefault dictGetOrNull dictGetRoot dictGetString dictGetStringOrDefault
dictGetUInt16 dictGetUInt16OrDefault dictGetUInt32 dictGetUInt32OrDefault dictGetUInt64
dictGetUInt64OrDefault dictGetUInt8 dictGetUInt8OrDefault dictGetUUID dictGetUUIDOrDefault
dictHas dictIsIn
regionHierarchy regionIn regionToArea regionToCity regionToContinent regionToCountry
regionToDistrict regionToName regionToPopulation regionToTopContinent
addressToLine addressToLineWithInlines addressToSymbol demangle isMergeTreePartCoveredBy
logTrace mergeTreePartInfo tid
_CAST __actionName __applyFilter __bitBoolMaskAnd __bitBoolMaskOr __bitSwapLastTwo
__bitWrapperFunc __getScalar __groupingForCube __groupingForGroupingSets
__groupingForRollup __groupingOrdinary __patchPartitionID __scalarSubqueryResult
__toYearCalendarOnly caseWithExpr caseWithExpression nested validateNestedArraySizes
assignCentroid evalMLMethod hierarchicalKMeans naiveBayesClassifier
naiveBayesClassifierWithAllProbs naiveBayesClassifierWithProb stochasticLinearRegression
stochasticLogisticRegression
"""

_REACHING_OUT = """
file joinGet joinGetOrNull hasColumnInTable
in notIn globalIn globalNotIn nullIn notNullIn globalNullIn globalNotNullIn inIgnoreSet
getSetting getSettingOrDefault getServerSetting getMergeTreeSetting getMacro
globalVariable getClientHTTPHeader currentRequestURL showCertificate
filesystemAvailable filesystemCapacity filesystemUnreserved getOSKernelVersion
hostName hostname FQDN fullHostName serverUUID buildId tcpPort getServerPort
currentUser current_user user session_user authUser authenticatedUser currentProfiles
enabledProfiles defaultProfiles currentRoles enabledRoles defaultRoles
pgGetUserById pg_get_userbyid pgTableIsVisible pg_table_is_visible
getMaxTableNameLengthForDatabase
generateSerialID transactionID transactionLatestSnapshot transactionOldestSnapshot
zookeeperSessionUptime sleep sleepEachRow
"""
"""From the category "Other" and its aliases: functions that read a table, a file, the
server's settings, hosts, users or disks, write to Keeper, or just wait."""

DENIED: frozenset[str] = frozenset(n.lower() for n in (_BY_CATEGORY + _REACHING_OUT).split())


def denied(name: str) -> bool:
    return name.lower() in DENIED
