// Alerts on the app's telemetry in Application Insights, all routed to one action group:
//   - HTTP 5xx rate (percent of requests in a 5-minute bin),
//   - p95 request latency,
//   - failed batch runs (the app logs the event "batch_failed"),
//   - cold-start model load failures (the app logs the event "model_load_failed").
// They are log search alerts (scheduledQueryRules): a percentile and a 5xx share are not platform
// metrics of a Flex Consumption app, and the two events are the app's own structured logs.
// The event name is the log message (traces.message) and, when the logger adds it, the
// customDimensions field "event"; a logger.exception() call lands in the exceptions table.

@description('Azure region of the alert rules (the region of Application Insights).')
param location string

@description('Name prefix of the alert rules and the action group.')
param namePrefix string

@description('Resource id of Application Insights.')
param appInsightsId string

@description('E-mail address that receives alerts; empty: the action group has no receiver.')
param alertEmail string = ''

@description('Alert when more than this percent of requests in a 5-minute bin answer 5xx.')
@minValue(1)
@maxValue(100)
param http5xxPercentThreshold int = 5

@description('Alert when the 95th percentile of request duration exceeds this many milliseconds.')
@minValue(100)
param p95LatencyThresholdMs int = 2000

@description('Tags for every resource.')
param tags object = {}

// Log event names the app emits (detector/telemetry.py); tests/test_infra.py checks they match.
var batchFailedEvent = 'batch_failed'
var modelLoadFailedEvent = 'model_load_failed'

var eventQuery = 'union isfuzzy=true (traces | project timestamp, text = message, customDimensions), (exceptions | project timestamp, text = strcat(outerMessage, " ", tostring(customDimensions)), customDimensions) | where text contains "{0}" or tostring(customDimensions["event"]) == "{0}"'

var emailReceivers = [
  {
    name: 'oncall-email'
    emailAddress: alertEmail
    useCommonAlertSchema: true
  }
]

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${namePrefix}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: take('ptd${uniqueString(namePrefix)}', 12)
    enabled: true
    emailReceivers: empty(alertEmail) ? [] : emailReceivers
  }
}

resource http5xx 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-http-5xx-rate'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: HTTP 5xx rate above ${http5xxPercentThreshold}%'
    description: 'Share of requests answered with a 5xx status, per 5-minute bin.'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: 'requests | summarize total = count(), failed = countif(toint(resultCode) >= 500) by bin(timestamp, 5m) | extend failedPercent = 100.0 * failed / total'
          metricMeasureColumn: 'failedPercent'
          timeAggregation: 'Maximum'
          operator: 'GreaterThan'
          threshold: http5xxPercentThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource p95Latency 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-p95-latency'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: p95 latency above ${p95LatencyThresholdMs} ms'
    description: '95th percentile of request duration per 5-minute bin (health checks excluded).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: 'requests | where name !contains "health" | summarize p95 = percentile(duration, 95) by bin(timestamp, 5m)'
          metricMeasureColumn: 'p95'
          timeAggregation: 'Maximum'
          operator: 'GreaterThan'
          threshold: p95LatencyThresholdMs
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource batchFailed 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-batch-failed'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: batch run failed'
    description: 'The blob-triggered batch function logged "${batchFailedEvent}".'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(eventQuery, batchFailedEvent)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource modelLoadFailed 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${namePrefix}-model-load-failed'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: model load failed on cold start'
    description: 'An instance could not load or verify the model ("${modelLoadFailedEvent}") and refuses to serve.'
    severity: 0
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      appInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: format(eventQuery, modelLoadFailedEvent)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = actionGroup.id
output alertRuleNames array = [
  http5xx.name
  p95Latency.name
  batchFailed.name
  modelLoadFailed.name
]
