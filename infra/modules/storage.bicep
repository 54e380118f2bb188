// Data storage account: the versioned model artifacts (`models`), the batch containers
// (`batch-in`, `batch-out`) and the Event Grid dead-letter container. Shared keys off (Entra ID
// only), no public blobs, TLS 1.2, HTTPS only; a CanNotDelete lock; data-plane logs of the blob
// service (read, write, delete on every container) to Log Analytics; optionally behind a firewall
// (vnetEnabled: the app and the operators reach it through private endpoints).
// Blob versioning and soft delete are account-wide settings in Azure Storage; the lifecycle
// policy below removes batch files (and their versions) after the retention period, so in
// practice only `models` keeps history.

@description('Azure region.')
param location string

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param name string

@description('Redundancy. Standard_LRS by default; GRS/ZRS/GZRS for geo- or zone-redundancy.')
@allowed([
  'Standard_LRS'
  'Standard_GRS'
  'Standard_ZRS'
  'Standard_GZRS'
])
param sku string = 'Standard_LRS'

@description('Container of the versioned model artifact sets and the pointer to the current one.')
param modelsContainerName string = 'models'

@description('Training data for scheduled retraining (ptd snapshot: latest/, outcomes/, evaluation/).')
param trainingContainerName string = 'training'

@description('Container the utilities drop billing exports into (Event Grid blob trigger source).')
param batchInContainerName string = 'batch-in'

@description('Container the batch function writes results, summaries and rejected rows to.')
param batchOutContainerName string = 'batch-out'

@description('Container Event Grid writes undeliverable BlobCreated events to (dead letters).')
param deadLetterContainerName string = 'eventgrid-deadletter'

@description('Days after the last modification before batch inputs and outputs are deleted.')
@minValue(1)
@maxValue(3650)
param batchRetentionDays int = 30

@description('Days a deleted or overwritten blob (or a deleted container) can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 30

// Version-level immutability (WORM) on `models`: every blob version written there (model files,
// manifests, audit events, each version of the pointer) can be neither changed nor deleted for
// this many days; new versions can still be written (versioning is on), so publishing and
// activating work as before. Needs blob versioning (on above) and no hierarchical namespace.
// Deployed unlocked (an administrator can shorten or remove it); lock it for compliance.
// Learn: "Overview of immutable storage for blob data", "Configure immutability policies for
// blob versions". An existing container must be migrated first (RUNBOOKS).
@description('Days each version of a blob in the models container stays immutable (WORM); 0 turns it off. A container under WORM can only be deleted once empty.')
@minValue(0)
@maxValue(146000)
param modelsImmutabilityDays int = 30

@description('Network isolation: firewall on (defaultAction Deny); only private endpoints, trusted Azure services (Event Grid dead-lettering with its identity) and allowedIpRanges get in.')
param vnetEnabled bool = false

@description('With vnetEnabled: public IP ranges (CIDR) still allowed, e.g. a self-hosted runner or an operator network.')
param allowedIpRanges array = []

@description('Put a CanNotDelete lock on the account (a deleted account cannot be restored with its blobs).')
param lockAccount bool = true

@description('Resource id of the Log Analytics workspace that receives the blob data-plane logs; empty: none.')
param workspaceId string = ''

@description('Tags for every resource.')
param tags object = {}

// With vnetEnabled the public endpoint stays "Enabled" but answers only what the firewall allows:
// "Disabled" would also shut out the trusted-service exception Event Grid needs to write dead
// letters with its managed identity, and the allowedIpRanges escape hatch.
// https://learn.microsoft.com/azure/storage/common/storage-network-security (trusted services)
var firewall = {
  defaultAction: 'Deny'
  bypass: 'AzureServices'
  ipRules: [for range in allowedIpRanges: {
    value: range
    action: 'Allow'
  }]
}
var open = {
  defaultAction: 'Allow'
  bypass: 'AzureServices'
}
var networkAcls = vnetEnabled ? firewall : open

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: sku
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: networkAcls
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    isVersioningEnabled: true
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
  }
}

resource models 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: modelsContainerName
  properties: {
    publicAccess: 'None'
    immutableStorageWithVersioning: {
      enabled: modelsImmutabilityDays > 0
    }
  }
}

// What a scheduled retrain learns from: the utility's latest tables, its inspectors' outcome
// files and a labelled evaluation set (detector/training/snapshot.py, docs/RUNBOOKS.md).
resource training 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: trainingContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource modelsImmutability 'Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies@2023-05-01' = if (modelsImmutabilityDays > 0) {
  parent: models
  name: 'default'
  properties: {
    immutabilityPeriodSinceCreationInDays: modelsImmutabilityDays
    allowProtectedAppendWrites: false
  }
}

resource batchIn 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: batchInContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource batchOut 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: batchOutContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Event Grid writes events it could not deliver to the blob trigger's webhook here (one JSON blob
// per event, under <system topic>/<subscription>/<y>/<m>/<d>/<h>/): see docs/RUNBOOKS.md
// "Dead-lettered events". https://learn.microsoft.com/azure/event-grid/manage-event-delivery
resource deadLetter 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deadLetterContainerName
  properties: {
    publicAccess: 'None'
  }
}

// The Event Grid blob trigger writes blobs that keep failing to the queue
// `webjobs-blobtrigger-poison` of the trigger's own connection (STORAGE): create it here so the
// app needs no right to create queues.
resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: 'webjobs-blobtrigger-poison'
}

resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'delete-batch-files'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${batchInContainerName}/'
                '${batchOutContainerName}/'
                '${deadLetterContainerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: batchRetentionDays
                }
              }
              version: {
                delete: {
                  daysAfterCreationGreaterThan: batchRetentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
  dependsOn: [
    batchIn
    batchOut
    deadLetter
  ]
}

// Deleting the account would take every model version and batch file with it (soft delete only
// protects blobs and containers inside a living account). The lock blocks deleting the account
// (not its data: that is what versioning and soft delete are for); setting it needs
// Microsoft.Authorization/locks/write (docs/DEPLOYMENT_GUIDE.md, 1.3).
// https://learn.microsoft.com/azure/azure-resource-manager/management/lock-resources
resource accountLock 'Microsoft.Authorization/locks@2020-05-01' = if (lockAccount) {
  name: 'do-not-delete-${name}'
  scope: account
  properties: {
    level: 'CanNotDelete'
    notes: 'Holds every published model version and the batch files: remove the lock deliberately before deleting the account.'
  }
}

// Who read, wrote or deleted what in batch-in, batch-out, models and the dead-letter container
// (StorageBlobLogs). Diagnostic settings exist per service, so one setting covers every container.
// https://learn.microsoft.com/azure/storage/blobs/monitor-blob-storage-reference
resource blobLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(workspaceId)) {
  name: 'blob-data-plane-to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'StorageRead'
        enabled: true
      }
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
  }
}

output id string = account.id
output name string = account.name
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output modelsContainerName string = models.name
output trainingContainerName string = training.name
output batchInContainerName string = batchIn.name
output batchOutContainerName string = batchOut.name
output deadLetterContainerName string = deadLetter.name
output poisonQueueName string = poisonQueue.name
